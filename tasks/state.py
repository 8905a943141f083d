"""Redis: the health ping and the audit's state between runs (query window, open
incidents)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import redis
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ue_pilot.checks import CheckResult, failed, passed
from ue_pilot.clients import build_redis
from ue_pilot.settings import Settings


@task(name="ping-redis", retries=2, retry_delay_seconds=[5, 15], cache_policy=NO_CACHE)
def ping_redis(settings: Settings) -> CheckResult:
    """Ping Redis, the application's session and rate-limit store."""
    try:
        build_redis(settings).ping()
    except redis.RedisError as error:
        return failed(
            "health.redis",
            f"Redis unreachable: {type(error).__name__}: {str(error)[:200]}",
        )
    return passed("health.redis", "Redis answers PING")


def window_key(settings: Settings) -> str:
    return f"{settings.state_prefix}:audit:window-end"


@task(name="plan-window", cache_policy=NO_CACHE)
def plan_window(settings: Settings) -> tuple[datetime, datetime]:
    """Choose the query window: from the previous window's end less the overlap.

    Late-ingested rows land in the overlap, so the next run still sees them.
    The first run, or a run after Redis lost its state, covers one interval
    plus the overlap; the start never reaches back past the maximum lookback.
    """
    logger = get_run_logger()
    now = datetime.now(UTC)
    overlap = timedelta(minutes=settings.window_overlap_minutes)
    start = now - timedelta(minutes=settings.window_minutes) - overlap
    try:
        previous = build_redis(settings).get(window_key(settings))
    except redis.RedisError as error:
        logger.warning(
            "window state unavailable (%s); using the default window",
            type(error).__name__,
        )
        previous = None
    if previous:
        start = min(start, datetime.fromisoformat(previous) - overlap)
    earliest = now - timedelta(minutes=settings.window_max_lookback_minutes)
    return max(start, earliest), now


def record_window(settings: Settings, end: datetime) -> None:
    """Store the end of a window whose telemetry queries all succeeded."""
    try:
        # The key expires once it is older than the maximum lookback, which
        # would cap the next window's start anyway.
        build_redis(settings).set(
            window_key(settings),
            end.isoformat(),
            ex=settings.window_max_lookback_minutes * 60,
        )
    except redis.RedisError as error:
        get_run_logger().warning(
            "could not record the window end: %s", type(error).__name__
        )
