"""Redis: the health ping and the audit's state between runs (query window, open
incidents)."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime, timedelta

import redis
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ue_pilot.checks import CheckResult, failed, passed
from ue_pilot.clients import build_redis, probe_agents_key
from ue_pilot.settings import Settings


@task(name="ping-redis", retries=2, retry_delay_seconds=[5, 15], cache_policy=NO_CACHE)
def ping_redis(settings: Settings) -> CheckResult:
    """Ping Redis, the application's session and rate-limit store."""
    try:
        build_redis(settings).ping()
    except (redis.RedisError, ValueError) as error:
        return failed(
            "health.redis",
            f"Redis unreachable: {type(error).__name__}: {str(error)[:200]}",
        )
    return passed("health.redis", "Redis answers PING")


@task(name="register-probe-agent", cache_policy=NO_CACHE)
def register_probe_agent(settings: Settings) -> tuple[str, list[str]]:
    """Pick this run's probe User-Agent and return it with those of recent runs.

    The random run marker cannot be guessed from outside, so no client can hide
    requests among the probes that the auth failure counts leave out. Without
    Redis only this run's agent is known, and earlier runs' probes count as
    ordinary traffic: the rate can then only read too high, never too low.
    """
    agent = f"{settings.probe_user_agent} run/{secrets.token_hex(8)}"
    now = time.time()
    key = probe_agents_key(settings.base_url)
    oldest = now - settings.window_max_lookback_minutes * 60
    try:
        store = build_redis(settings)
        store.zadd(key, {agent: now})
        store.zremrangebyscore(key, "-inf", oldest)
        agents = list(store.zrange(key, 0, -1))
    except (redis.RedisError, ValueError) as error:
        get_run_logger().warning("probe agents unavailable (%s)", type(error).__name__)
        agents = [agent]
    return agent, agents


def window_key(settings: Settings) -> str:
    return f"{settings.state_prefix}:audit:window-end"


@task(name="plan-window", cache_policy=NO_CACHE)
def plan_window(settings: Settings) -> tuple[datetime, datetime]:
    """Choose the query window: from the previous window's end less the overlap.

    Late-ingested rows land in the overlap, so the next run still reads them.
    The first run, or a run after Redis lost its state, covers one interval
    plus the overlap; the start never reaches back past the maximum lookback.
    """
    logger = get_run_logger()
    now = datetime.now(UTC)
    overlap = timedelta(minutes=settings.window_overlap_minutes)
    start = now - timedelta(minutes=settings.window_minutes) - overlap
    try:
        previous = build_redis(settings).get(window_key(settings))
    except (redis.RedisError, ValueError) as error:
        logger.warning(
            "window state unavailable (%s); using the default window",
            type(error).__name__,
        )
        previous = None
    try:
        if previous:
            start = min(start, datetime.fromisoformat(previous) - overlap)
    except (ValueError, TypeError):
        logger.warning("stored window end %r is not an aware ISO time; ignored",
                       previous[:40])
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
    except (redis.RedisError, ValueError) as error:
        get_run_logger().warning(
            "could not record the window end: %s", type(error).__name__
        )
