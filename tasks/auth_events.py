"""Sign-ins of one org in Application Insights since a given time: the
rollback's proof, besides Clerk, that no session of a disabled org still works.

Zero `auth_success` rows prove nothing while telemetry lags, so the rows count
only once telemetry has arrived from after that time: some liveness event
(`UE_LIVENESS_EVENTS`, of any org) must be newer than it. Until then the check
waits, polling, and at the end of its wait it is inconclusive, never a pass.

NOTE: Application Insights does not ingest rows in timestamp order, so one
newer row shows that telemetry flows past the disable, not that every older
row has arrived. The wait makes a late row less likely to be missed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ue_pilot.clients import build_logs_client
from ue_pilot.settings import Settings
from tasks.logs import QUERIES, as_utc, kql_list, kql_string, render, run_query

# One row per user with the sign-ins recorded for the org, weighted by
# itemCount (adaptive sampling).
AUTH_SUCCESS_QUERY = """$events
| where $name == "auth_success"
| where tostring($dims.orgId) == $org
| summarize events = sum($items), first_seen = min($ts), last_seen = max($ts)
    by userId = tostring($dims.userId)"""


@dataclass
class SignInEvidence:
    """Telemetry evidence of an org's sign-ins since `since`.

    `status` is "none" (proved: no sign-in), "found" (sign-ins listed in
    `users`) or "inconclusive" (nothing proved, `problem` gives the reason).
    """

    status: str
    since: str
    newest_telemetry: str | None = None
    users: list[dict] = field(default_factory=list)
    problem: str = ""
    queries: int = 0

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "since": self.since,
            "newest_telemetry": self.newest_telemetry,
            "users": self.users,
            "problem": self.problem,
            "queries": self.queries,
        }


def sign_ins_since(settings: Settings, org: str, since: datetime) -> SignInEvidence:
    """Wait until telemetry is newer than `since`, then list the org's sign-ins.

    Polls every UE_ROLLBACK_TELEMETRY_POLL_SECONDS for at most
    UE_ROLLBACK_TELEMETRY_WAIT_SECONDS.
    """
    evidence = SignInEvidence("inconclusive", since.isoformat())
    if not (settings.logs_resource_id or settings.logs_workspace_id):
        evidence.problem = (
            "no UE_LOGS_RESOURCE_ID or UE_LOGS_WORKSPACE_ID is set, so telemetry "
            "cannot show whether the org's sessions still sign in"
        )
        return evidence
    client = build_logs_client(settings)
    liveness_query = render(
        QUERIES["liveness_events"], settings,
        event_names=kql_list(settings.liveness_events),
    )
    auth_query = render(AUTH_SUCCESS_QUERY, settings, org=kql_string(org))
    deadline = time.monotonic() + settings.rollback_telemetry_wait_seconds

    while True:
        window = (since, datetime.now(UTC))
        if check_once(client, settings, liveness_query, auth_query, window, evidence):
            return evidence
        if time.monotonic() >= deadline:
            evidence.problem = (
                f"{evidence.problem} (waited "
                f"{settings.rollback_telemetry_wait_seconds:g} s)"
            )
            return evidence
        time.sleep(settings.rollback_telemetry_poll_seconds)


def check_once(
    client,
    settings: Settings,
    liveness_query: str,
    auth_query: str,
    window: tuple[datetime, datetime],
    evidence: SignInEvidence,
) -> bool:
    """Query once; fill `evidence` and return True when it proves either way."""
    liveness = run_query(client, settings, liveness_query, window)
    evidence.queries += 1
    if not liveness.ok:
        evidence.problem = f"liveness query: {liveness.problem}"
        return False
    newest = max(
        (as_utc(row["latest"]) for row in liveness.rows if row["rows"]),
        default=None,
    )
    if newest is None or newest <= window[0]:
        evidence.problem = (
            f"no telemetry newer than {window[0].isoformat()} has arrived, so zero "
            "sign-ins would prove nothing"
        )
        return False
    evidence.newest_telemetry = newest.isoformat()

    sign_ins = run_query(client, settings, auth_query, window)
    evidence.queries += 1
    if not sign_ins.ok:
        evidence.problem = f"auth_success query: {sign_ins.problem}"
        return False
    evidence.users = [
        {
            "user_id": row["userId"],
            "events": int(row["events"] or 0),
            "last_seen": as_utc(row["last_seen"]).isoformat(),
        }
        for row in sign_ins.rows
        if row["events"]
    ]
    evidence.status = "found" if evidence.users else "none"
    evidence.problem = ""
    return True
