"""PagerDuty Events API v2: trigger on failed checks, resolve when they pass again.

Dedup keys are stable per org and check, so an hourly failure stays one
incident. Keys of open incidents are kept in Redis so that a passing check
resolves only what this tool opened, instead of sending a resolve for every
passing check every hour.
"""

from __future__ import annotations

import asyncio

import httpx
import redis
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ue_pilot.checks import CheckResult, Status
from ue_pilot.clients import build_redis
from ue_pilot.settings import Settings

# PagerDuty returns 400 for an invalid event, which a retry cannot fix, while 429
# and 5xx are worth retrying.
RETRY_STATUSES = {429, 500, 502, 503, 504}
MAX_ATTEMPTS = 4


def dedup_key(check: CheckResult) -> str:
    return f"ue-pilot/{check.org or 'deployment'}/{check.id}"


def severity(check: CheckResult) -> str:
    return "critical" if check.is_isolation else "error"


def build_event(settings: Settings, action: str, check: CheckResult) -> dict:
    event = {
        "routing_key": settings.pagerduty_routing_key.get_secret_value(),
        "event_action": action,
        "dedup_key": dedup_key(check),
    }
    if action == "trigger":
        scope = f"org {check.org}" if check.org else "deployment"
        event["payload"] = {
            "summary": f"UE pilot {check.id} failed for {scope}: {check.summary}"[
                :1024
            ],
            "source": settings.pagerduty_source,
            "severity": severity(check),
            "component": check.id,
            "custom_details": {
                "org": check.org,
                "check": check.id,
                "observed": check.observed,
            },
        }
    return event


async def send_event(client: httpx.AsyncClient, url: str, event: dict) -> str:
    """Send one event, retrying 429 and 5xx with backoff; return an outcome."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            response = await client.post(url, json=event)
        except httpx.HTTPError as error:
            outcome = f"error: {type(error).__name__}"
        else:
            if response.status_code == 202:
                return "sent"
            if response.status_code not in RETRY_STATUSES:
                # The body is left out: an error body may quote the routing key.
                return f"rejected: HTTP {response.status_code}"
            outcome = f"HTTP {response.status_code}"
        await asyncio.sleep(min(2**attempt, 30))
    return f"gave up after {MAX_ATTEMPTS} attempts ({outcome})"


@task(name="escalate", retries=1, retry_delay_seconds=30, cache_policy=NO_CACHE)
async def escalate(settings: Settings, checks: list[CheckResult]) -> dict[str, object]:
    """Trigger an event per failed check and resolve incidents whose check passed."""
    logger = get_run_logger()
    if not settings.pagerduty_routing_key.get_secret_value():
        logger.warning("paging skipped: UE_PAGERDUTY_ROUTING_KEY is not set")
        return {"skipped": "no routing key"}

    store = build_redis(settings)
    open_key = f"{settings.state_prefix}:open-incidents"
    try:
        already_open = set(store.smembers(open_key))
    except (redis.RedisError, ValueError) as error:
        logger.warning(
            "open incidents unknown (%s); no resolves this run", type(error).__name__
        )
        already_open, store = set(), None

    events = [("trigger", c) for c in checks if c.status == Status.FAIL]
    events += [
        ("resolve", c)
        for c in checks
        if c.status == Status.PASS and dedup_key(c) in already_open
    ]
    limit = asyncio.Semaphore(8)

    async def deliver(client, action, check):
        async with limit:
            return await send_event(
                client,
                settings.pagerduty_events_url,
                build_event(settings, action, check),
            )

    async with httpx.AsyncClient(timeout=15, trust_env=False) as client:
        outcomes = await asyncio.gather(*[deliver(client, a, c) for a, c in events])

    summary = {"triggered": [], "resolved": [], "errors": []}
    for (action, check), outcome in zip(events, outcomes):
        key = dedup_key(check)
        if outcome != "sent":
            summary["errors"].append(
                {"dedup_key": key, "action": action, "outcome": outcome}
            )
            logger.error("paging %s %s: %s", action, key, outcome)
            continue
        summary["triggered" if action == "trigger" else "resolved"].append(key)
    if store is not None:
        try:
            if summary["triggered"]:
                store.sadd(open_key, *summary["triggered"])
            if summary["resolved"]:
                store.srem(open_key, *summary["resolved"])
        except redis.RedisError as error:
            logger.warning("could not record open incidents: %s", type(error).__name__)
    logger.info(
        "paging: %d triggered, %d resolved, %d errors",
        len(summary["triggered"]),
        len(summary["resolved"]),
        len(summary["errors"]),
    )
    return summary


CRASH_CHECK_ID = "flow.crashed"


async def page_flow_crash(flow, flow_run, state) -> None:
    """Trigger one PagerDuty event of severity error for a crashed or timed-out run.

    The flows list this as an `on_crashed` and an `on_failure` hook. Prefect
    calls it in the flow's process, or in the worker or `serve` process when the
    flow's process died. A failure other than a timeout is left to the flow.
    It logs every Exception instead of raising it, because a hook that raises
    would bury the crash under its own traceback.
    """
    try:
        if state.is_crashed() or state.name == "TimedOut":
            await _page_crash(flow, flow_run, state)
    except Exception as error:
        import logging

        logging.getLogger(__name__).error(
            "paging for %s of flow run %s failed: %s",
            getattr(state, "name", state),
            getattr(flow_run, "id", flow_run),
            type(error).__name__,
        )


async def _page_crash(flow, flow_run, state) -> None:
    from prefect.logging.loggers import flow_run_logger

    logger = flow_run_logger(flow_run, flow)
    try:
        outcome = await _send_crash_event(flow, flow_run, state, logger)
    except Exception as error:
        # Settings and HTTP errors can quote a secret, so only the type is logged.
        logger.error(
            "paging for %s of flow run %s failed: %s",
            state.name,
            flow_run.id,
            type(error).__name__,
        )
        return
    logger.info("paging %s of flow run %s: %s", state.name, flow_run.id, outcome)


async def _send_crash_event(flow, flow_run, state, logger) -> str:
    from ue_pilot.redact import redact_text

    settings = Settings()
    if not settings.pagerduty_routing_key.get_secret_value():
        return "skipped: UE_PAGERDUTY_ROUTING_KEY is not set"
    scope = await _run_scope(flow, flow_run, logger)
    verb = "timed out" if state.name == "TimedOut" else "crashed"
    message = redact_text(state.message or state.name, settings.secret_values())
    event = {
        "routing_key": settings.pagerduty_routing_key.get_secret_value(),
        "event_action": "trigger",
        "dedup_key": f"ue-pilot/{scope}/{CRASH_CHECK_ID}",
        "payload": {
            "summary": f"UE pilot flow run {flow_run.name} of {scope} {verb}: "
            f"{message}"[:1024],
            "source": settings.pagerduty_source,
            "severity": "error",
            "component": CRASH_CHECK_ID,
            "custom_details": {
                "flow_run_id": str(flow_run.id),
                "deployment_id": str(flow_run.deployment_id or ""),
                "state": state.name,
                "message": message[:2000],
            },
        },
    }
    async with httpx.AsyncClient(timeout=15, trust_env=False) as client:
        return await send_event(client, settings.pagerduty_events_url, event)


async def _run_scope(flow, flow_run, logger) -> str:
    """Return `<flow>/<deployment>` for a deployment's run, else the flow name."""
    if flow_run.deployment_id is None:
        return flow.name
    from prefect.client.orchestration import get_client

    try:
        async with get_client() as client:
            deployment = await client.read_deployment(flow_run.deployment_id)
    except Exception as error:  # the page matters more than its dedup scope
        logger.warning(
            "deployment %s not read (%s), so paging under the flow name",
            flow_run.deployment_id,
            type(error).__name__,
        )
        return flow.name
    return f"{flow.name}/{deployment.name}"
