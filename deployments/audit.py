"""The hourly isolation audit as a Prefect deployment."""

from __future__ import annotations

from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.schedules import Cron

from deployments import DEPLOYMENTS
from flows.isolation_audit import isolation_audit
from ue_pilot.settings import FlowRunSettings

AUDIT_CRON = "0 * * * *"
AUDIT_SPEC = next(s for s in DEPLOYMENTS if s.flow_name == "isolation-audit")


def audit_deployment(timezone: str | None = None):
    """Build the `isolation-audit/hourly` deployment.

    One run at a time: a run that comes due while another is still running is
    cancelled rather than queued, so a slow audit cannot pile up behind itself.
    The timezone of the cron comes from UE_SCHEDULE_TIMEZONE (default UTC).
    """
    timezone = timezone or FlowRunSettings().schedule_timezone
    return isolation_audit.to_deployment(
        name=AUDIT_SPEC.name,
        schedules=[Cron(AUDIT_CRON, timezone=timezone)],
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy="CANCEL_NEW"
        ),
        description=AUDIT_SPEC.description,
        tags=AUDIT_SPEC.tags,
    )
