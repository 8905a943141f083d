"""The hourly isolation audit as a Prefect deployment."""

from __future__ import annotations

import os

from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.schedules import Cron

from flows.isolation_audit import isolation_audit

AUDIT_CRON = "0 * * * *"


def audit_deployment(timezone: str | None = None):
    """Build the `isolation-audit/hourly` deployment.

    One run at a time: a run that comes due while another is still running is
    cancelled rather than queued, so a slow audit cannot pile up behind itself.
    The timezone of the cron comes from UE_SCHEDULE_TIMEZONE (default UTC).
    """
    timezone = timezone or os.environ.get("UE_SCHEDULE_TIMEZONE", "UTC")
    return isolation_audit.to_deployment(
        name="hourly",
        schedules=[Cron(AUDIT_CRON, timezone=timezone)],
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy="CANCEL_NEW"
        ),
        description="Hourly isolation audit of every pilot org.",
        tags=["ue-pilot", "isolation-audit"],
    )
