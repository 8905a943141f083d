"""Application Insights for onboarding: the telemetry side of isolation (step 4)
and the proof that monitoring fires (step 7).

Step 7 sends one synthetic cross-org event for the new org through the
ingestion endpoint of `UE_APPINSIGHTS_CONNECTION_STRING` (`POST
<IngestionEndpoint>/v2.1/track`, the Monitor.Exporters API), then runs the
audit's own cross-org KQL until it finds the event. The event is an
`rls_context_set` whose context org `ue-pilot-synthetic` differs from the new
org, with `customDimensions.synthetic = "ue-pilot-onboarding"`, the flow run
id, and a route `/ue-pilot/onboarding-test/<run id>` that no real request has.

Each planted route is kept in Redis for the audit's lookback period, so that
onboarding's own isolation check (and any audit that reads the same key)
leaves these events out while still counting every real cross-org attempt.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx
import redis
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.logs import (
    QUERIES,
    QueryOutcome,
    build_queries,
    evaluate_telemetry,
    run_query,
)
from ue_pilot.checks import CheckResult, Status, failed, inconclusive, passed
from ue_pilot.clients import (
    build_logs_client,
    build_redis,
    is_loopback,
    synthetic_routes_key,
)
from ue_pilot.settings import Settings

SYNTHETIC_LABEL = "ue-pilot-onboarding"
SYNTHETIC_CONTEXT_ORG = "ue-pilot-synthetic"
SYNTHETIC_ROUTE_PREFIX = "/ue-pilot/onboarding-test/"
# Ingestion endpoint of the classic SDKs when the connection string names none.
DEFAULT_INGESTION_ENDPOINT = "https://dc.services.visualstudio.com/"
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
MAX_ATTEMPTS = 4
# The detection query looks this far back before the event's own timestamp.
DETECTION_LOOKBACK = timedelta(minutes=5)
ISOLATION_CHECKS = ("telemetry.liveness", "telemetry.cross_org_events")


class ConnectionStringError(ValueError):
    """UE_APPINSIGHTS_CONNECTION_STRING is missing a key or names an unsafe endpoint."""


@dataclass(frozen=True)
class IngestionTarget:
    """The instrumentation key and the track URL of a connection string."""

    instrumentation_key: str
    track_url: str


def parse_connection_string(text: str) -> IngestionTarget:
    """Read `InstrumentationKey` and `IngestionEndpoint` from a connection string.

    The key is required and must be a GUID. The endpoint must use https unless
    it is on loopback (the sandbox).
    """
    if not text.strip():
        raise ConnectionStringError(
            "UE_APPINSIGHTS_CONNECTION_STRING is not set: onboarding sends its "
            "test event with it; copy it from the Application Insights resource"
        )
    parts = {}
    for part in text.split(";"):
        name, _, value = part.partition("=")
        if name.strip():
            parts[name.strip().lower()] = value.strip()
    key = parts.get("instrumentationkey", "")
    try:
        uuid.UUID(key)
    except ValueError:
        # The text is a secret, so the message never quotes it.
        raise ConnectionStringError(
            "invalid UE_APPINSIGHTS_CONNECTION_STRING: it has no InstrumentationKey "
            "GUID; copy the connection string from the Application Insights resource"
        ) from None
    endpoint = parts.get("ingestionendpoint") or DEFAULT_INGESTION_ENDPOINT
    if urlsplit(endpoint).scheme != "https" and not is_loopback(endpoint):
        raise ConnectionStringError(
            f"invalid IngestionEndpoint {endpoint!r} in "
            "UE_APPINSIGHTS_CONNECTION_STRING: use https (plain http only on loopback)"
        )
    return IngestionTarget(key, endpoint.rstrip("/") + "/v2.1/track")


def synthetic_route(flow_run_id: str) -> str:
    return SYNTHETIC_ROUTE_PREFIX + flow_run_id


def build_synthetic_event(
    instrumentation_key: str, org_id: str, flow_run_id: str, moment: datetime
) -> dict:
    """Build the track envelope of the synthetic cross-org event."""
    return {
        "ver": 1,
        "name": "Microsoft.ApplicationInsights.Event",
        "time": moment.isoformat(),
        "iKey": instrumentation_key,
        "tags": {"ai.cloud.role": SYNTHETIC_LABEL,
                 "ai.operation.id": flow_run_id.replace("-", "")},
        "data": {
            "baseType": "EventData",
            "baseData": {
                "ver": 2,
                "name": "rls_context_set",
                "properties": {
                    "orgId": SYNTHETIC_CONTEXT_ORG,
                    "requestOrgId": org_id,
                    "userId": SYNTHETIC_LABEL,
                    "route": synthetic_route(flow_run_id),
                    "synthetic": SYNTHETIC_LABEL,
                    "flowRunId": flow_run_id,
                },
            },
        },
    }


def register_synthetic_route(settings: Settings, route: str) -> None:
    """Keep `route` in Redis for the lookback period, so checks can leave it out.

    The key expires one lookback period after the last route was added.
    """
    now = time.time()
    lookback = settings.window_max_lookback_minutes * 60
    key = synthetic_routes_key(settings.base_url)
    store = build_redis(settings)
    store.zadd(key, {route: now})
    store.zremrangebyscore(key, "-inf", now - lookback)
    store.expire(key, lookback)


def recent_synthetic_routes(settings: Settings) -> set[str]:
    """Return the synthetic routes planted within the lookback period."""
    oldest = time.time() - settings.window_max_lookback_minutes * 60
    key = synthetic_routes_key(settings.base_url)
    return set(build_redis(settings).zrangebyscore(key, oldest, "+inf"))


@task(name="query-telemetry-isolation", retries=2, retry_delay_seconds=[10, 30],
      cache_policy=NO_CACHE)
def query_telemetry_isolation(settings: Settings, org_id: str) -> list[CheckResult]:
    """Run the audit's liveness and cross-org queries for the new org.

    Events that onboarding runs planted (their routes are in Redis) are left
    out of the cross-org rows, so an earlier run's test event fails no later
    run. Without Redis nothing is left out, so the check can only fail more.
    """
    logger = get_run_logger()
    now = datetime.now(UTC)
    window = (now - timedelta(minutes=settings.window_minutes), now)
    try:
        synthetic = recent_synthetic_routes(settings)
    except (redis.RedisError, ValueError) as error:
        logger.warning("synthetic routes unknown (%s); none left out",
                       type(error).__name__)
        synthetic = set()
    outcomes = run_isolation_queries(settings, window)
    cross_org = outcomes["cross_org"]
    if cross_org.ok:
        outcomes["cross_org"] = QueryOutcome(
            [row for row in cross_org.rows if row["route"] not in synthetic]
        )
    checks = evaluate_telemetry(settings, [org_id], outcomes, now)
    left_out = len(cross_org.rows or []) - len(outcomes["cross_org"].rows or [])
    logger.info("telemetry isolation of %s: %d synthetic row(s) left out",
                org_id, left_out)
    return [check for check in checks if check.id in ISOLATION_CHECKS]


def run_isolation_queries(
    settings: Settings, window: tuple[datetime, datetime]
) -> dict[str, QueryOutcome]:
    """Run the liveness and cross-org queries; mark the others as not run."""
    outcomes = {key: QueryOutcome(None, "not run by onboarding") for key in QUERIES}
    if not (settings.logs_resource_id or settings.logs_workspace_id):
        problem = "no UE_LOGS_RESOURCE_ID or UE_LOGS_WORKSPACE_ID is set"
        return {key: QueryOutcome(None, problem) for key in QUERIES}
    client = build_logs_client(settings)
    queries = build_queries(settings, [])
    for key in ("liveness_events", "liveness_metrics", "cross_org"):
        outcomes[key] = run_query(client, settings, queries[key], window)
    return outcomes


@task(name="plant-synthetic-event", cache_policy=NO_CACHE)
def plant_synthetic_event(
    settings: Settings, org_id: str, flow_run_id: str
) -> CheckResult:
    """Send the synthetic cross-org event and prove the ingestion accepted it."""
    logger = get_run_logger()
    check_id = "onboarding.synthetic_event"
    route = synthetic_route(flow_run_id)

    try:
        target = parse_connection_string(
            settings.appinsights_connection_string.get_secret_value()
        )
        register_synthetic_route(settings, route)
    except ConnectionStringError as error:
        return failed(check_id, str(error), org_id)
    except (redis.RedisError, ValueError) as error:
        return inconclusive(
            check_id,
            f"the synthetic route could not be kept in Redis ({type(error).__name__}),"
            " so later checks could not leave the event out; nothing was sent",
            org_id,
        )

    moment = datetime.now(UTC)
    event = build_synthetic_event(target.instrumentation_key, org_id, flow_run_id,
                                  moment)
    status, body = send_track(target.track_url, event)
    logger.info("synthetic event for %s: HTTP %s", org_id, status)

    observed = {"route": route, "sent_at": moment.isoformat(), "http_status": status,
                "label": SYNTHETIC_LABEL}
    if status == 200 and body.get("itemsAccepted") == 1:
        return passed(check_id, "the ingestion endpoint accepted the synthetic event",
                      org_id, **observed)
    errors = [str(item.get("message", ""))[:200] for item in body.get("errors", [])]
    return failed(check_id, f"the ingestion endpoint did not accept the event: "
                  f"HTTP {status} {errors}", org_id, **observed)


def send_track(url: str, event: dict) -> tuple[int | str, dict]:
    """POST one envelope, retrying 408, 429, 5xx and connection errors with backoff."""
    outcome: tuple[int | str, dict] = ("not sent", {})
    for attempt in range(MAX_ATTEMPTS):
        try:
            response = httpx.post(url, json=[event], timeout=15, trust_env=False)
        except httpx.HTTPError as error:
            outcome = (f"error: {type(error).__name__}", {})
        else:
            try:
                body = response.json()
            except ValueError:
                body = {}
            outcome = (response.status_code, body if isinstance(body, dict) else {})
            if response.status_code not in RETRY_STATUSES:
                return outcome
        time.sleep(min(2**attempt, 8))
    return outcome


@task(name="await-detection", cache_policy=NO_CACHE)
def await_detection(
    settings: Settings, org_id: str, flow_run_id: str, sent_at: str
) -> CheckResult:
    """Run the audit's cross-org query until it reports the synthetic event.

    Ingestion into Azure takes minutes, so the query repeats until
    UE_ONBOARDING_DETECTION_TIMEOUT_SECONDS have passed.
    """
    logger = get_run_logger()
    check_id = "onboarding.detection"
    route = synthetic_route(flow_run_id)
    if not (settings.logs_resource_id or settings.logs_workspace_id):
        return inconclusive(check_id, "no UE_LOGS_RESOURCE_ID or "
                            "UE_LOGS_WORKSPACE_ID is set", org_id)
    start = datetime.fromisoformat(sent_at) - DETECTION_LOOKBACK
    timeout = settings.onboarding_detection_timeout_seconds
    interval = min(30.0, max(1.0, timeout / 20))
    deadline = time.monotonic() + timeout
    client = build_logs_client(settings)
    query = build_queries(settings, [])["cross_org"]
    problems: list[str] = []
    attempts = 0
    while True:
        attempts += 1
        outcome = run_query(client, settings, query, (start, datetime.now(UTC)))
        if not outcome.ok:
            problems.append(outcome.problem)
        else:
            found = [row for row in outcome.rows if row["route"] == route
                     and org_id in (row["orgId"], row["requestOrgId"])]
            if found:
                waited = round(timeout - (deadline - time.monotonic()), 1)
                logger.info("synthetic event of %s detected after %s s", org_id,
                            waited)
                return passed(
                    check_id,
                    f"the audit's cross-org query found the synthetic event after "
                    f"{waited} s",
                    org_id, route=route, queries=attempts,
                    attempts=[{k: str(v) for k, v in row.items()} for row in found],
                )
        if time.monotonic() + interval > deadline:
            break
        time.sleep(interval)
    observed = {"route": route, "queries": attempts, "query_problems": problems[-3:]}
    if problems and len(problems) == attempts:
        return inconclusive(check_id, "every cross-org query failed", org_id,
                            **observed)
    return failed(
        check_id,
        f"the audit's cross-org query did not find the synthetic event within "
        f"{timeout:g} s: telemetry is not ingested or not queryable",
        org_id,
        **observed,
    )


def page_checks(org_id: str, flow_run_id: str) -> tuple[CheckResult, CheckResult]:
    """Return the failing and the passing check that open and resolve the test page.

    The id `onboarding.test_page` gives the page a dedup key of its own, so
    resolving it can never close a real incident of the org.
    """
    summary = (f"synthetic cross-org event of onboarding run {flow_run_id} was "
               "detected; this is a test page and onboarding resolves it")
    trigger = CheckResult("onboarding.test_page", Status.FAIL,
                          {"synthetic": SYNTHETIC_LABEL, "flow_run_id": flow_run_id},
                          org_id, summary)
    resolve = passed("onboarding.test_page", "test page resolved", org_id)
    return trigger, resolve
