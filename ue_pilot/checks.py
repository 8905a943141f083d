"""Check results, their categories and the audit verdict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class Status(str, Enum):
    """Outcome of one check. Inconclusive means the check could not prove anything."""

    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


# Checks whose failure means one org may see another's data. They page as
# critical; every other failing check pages as error. The listed access checks
# fail when the application refuses legitimate use, which is not a breach.
ISOLATION_PREFIXES = ("rls.", "access.", "telemetry.cross_org", "export.ownership")
AVAILABILITY_CHECKS = {
    "access.export_allows_own_org",
    "access.cross_org_allows_min_role",
    "access.probe_sessions",
}


@dataclass
class CheckResult:
    """One check of one org (or of the whole deployment when `org` is None)."""

    id: str
    status: Status
    observed: dict[str, Any] = field(default_factory=dict)
    org: str | None = None
    summary: str = ""

    @property
    def is_isolation(self) -> bool:
        return (
            self.id.startswith(ISOLATION_PREFIXES)
            and self.id not in AVAILABILITY_CHECKS
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data


def passed(check_id: str, summary: str, org: str | None = None, **observed: Any):
    return CheckResult(check_id, Status.PASS, observed, org, summary)


def failed(check_id: str, summary: str, org: str | None = None, **observed: Any):
    return CheckResult(check_id, Status.FAIL, observed, org, summary)


def inconclusive(check_id: str, summary: str, org: str | None = None, **observed: Any):
    return CheckResult(check_id, Status.INCONCLUSIVE, observed, org, summary)


def verdict(checks: list[CheckResult]) -> Status:
    """Fail if any check failed, else inconclusive if any was, else pass.

    An empty list is inconclusive: no check ran, so nothing was proved.
    """
    statuses = {check.status for check in checks}
    if Status.FAIL in statuses:
        return Status.FAIL
    if Status.INCONCLUSIVE in statuses or not checks:
        return Status.INCONCLUSIVE
    return Status.PASS
