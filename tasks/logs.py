"""KQL checks over Application Insights telemetry (runbook steps 1 to 4 and the
Monitoring table).

Every query covers all orgs at once (summarize by org), so the number of
queries per audit is fixed. Zero rows is evidence only once liveness has shown
that the expected events and metrics are arriving at all.

Onboarding plants labelled synthetic cross-org events (tasks/telemetry_ingest.py)
and registers each one's route in Redis first. The cross-org check leaves out
exactly the rows whose route is registered, and counts them as
`synthetic_left_out`. The label alone is never trusted: anybody who can send
telemetry could forge it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from string import Template

import redis
from azure.core.exceptions import AzureError
from azure.monitor.query import LogsQueryPartialResult, LogsQueryStatus
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ue_pilot.checks import CheckResult, Status, failed, inconclusive, passed
from ue_pilot.clients import build_logs_client, logs_call_options
from ue_pilot.settings import Settings

# Table and column names of the two schemas Azure Monitor exposes the same
# telemetry under: the Application Insights resource (classic) and the Log
# Analytics workspace.
SCHEMAS = {
    "classic": {
        "events": "customEvents",
        "metrics": "customMetrics",
        "availability": "availabilityResults",
        "ts": "timestamp",
        "name": "name",
        "dims": "customDimensions",
        "items": "itemCount",
        "sum": "valueSum",
        "max": "valueMax",
        "success": "success",
    },
    "workspace": {
        "events": "AppEvents",
        "metrics": "AppMetrics",
        "availability": "AppAvailabilityResults",
        "ts": "TimeGenerated",
        "name": "Name",
        "dims": "Properties",
        "items": "ItemCount",
        "sum": "Sum",
        "max": "Max",
        "success": "Success",
    },
}


def kql_string(value: str) -> str:
    """Quote `value` as a KQL string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def kql_list(values: list[str]) -> str:
    return ", ".join(kql_string(value) for value in values)


def render(template: str, settings: Settings, **values: str) -> str:
    names = dict(SCHEMAS[settings.logs_schema])
    names.update(values)
    return Template(template).substitute(names)


QUERIES = {
    "liveness_events": """$events
| where $name in ($event_names)
| summarize rows = sum($items), latest = max($ts) by name = $name""",
    "liveness_metrics": """$metrics
| where $name in ($metric_names)
| summarize rows = sum($items), latest = max($ts) by name = $name""",
    # Runbook step 1, as one summary over the window.
    "ue_metrics": """$metrics
| where $name startswith "ue_"
| summarize rows = sum($items) by name = $name""",
    # Runbook step 2. Kusto rejects comparing two dynamic values, so both sides
    # are cast to string; a missing key becomes "".
    "cross_org": """$events
| where $name == "rls_context_set"
| extend orgId = tostring($dims.orgId), requestOrgId = tostring($dims.requestOrgId)
| where orgId != requestOrgId
| summarize attempts = sum($items), first_seen = min($ts), last_seen = max($ts)
    by orgId, requestOrgId, route = tostring($dims.route)""",
    # Runbook step 3, weighted by itemCount and without the audit's own probes.
    "auth": """$events
| where $name in ("auth_failure", "role_check_failed", "auth_success")
| where tostring($dims.userAgent) !in ($probe_agents)
| summarize events = sum($items) by name = $name, orgId = tostring($dims.orgId)""",
    # Runbook step 4.
    "query_volume": """$metrics
| where $name == $query_metric
| extend orgId = tostring($dims.orgId)
| summarize queryCount = sum($sum * $items) by orgId""",
    "monitor_readiness": """$availability
| where $name == $readiness_test
| summarize failures = sum(iff($success == false, $items, 0)), total = sum($items)
    by bin($ts, ${readiness_bin}m)""",
    "monitor_mismatch": """$metrics
| where $name == $mismatch_metric
| summarize total = sum($sum * $items)""",
    "monitor_auth_rate": """$events
| where $name in ("auth_failure", "auth_success")
| where tostring($dims.userAgent) !in ($probe_agents)
| summarize failures = sum(iff($name == "auth_failure", $items, 0)),
    total = sum($items) by bin($ts, ${auth_bin}m)""",
    # Rows may be pre-aggregated; the p99 of each row's maximum can only
    # overstate the true p99, so a pass is never false.
    "monitor_latency": """$metrics
| where $name == $latency_metric
| summarize p99 = percentile($max, 99), measurements = sum($items)
    by bin($ts, 5m)""",
    "monitor_export_unauthenticated": """$metrics
| where $name == $export_metric
| summarize total = sum($sum * $items)""",
}


def build_queries(settings: Settings, probe_agents: list[str]) -> dict[str, str]:
    """Render every query; `probe_agents` are the audit's own recent User-Agents.

    Each run probes with a User-Agent carrying a random run marker, so the
    auth failure counts can leave the audit's own probes out without letting
    anyone else hide behind a guessable User-Agent.
    """
    values = {
        "probe_agents": kql_list(probe_agents or [""]),
        "event_names": kql_list(settings.liveness_events),
        "metric_names": kql_list(settings.liveness_metrics),
        "query_metric": kql_string(settings.query_total_metric),
        "readiness_test": kql_string(settings.readiness_test_name),
        "readiness_bin": str(settings.readiness_window_minutes),
        "mismatch_metric": kql_string(settings.rls_mismatch_metric),
        "auth_bin": str(settings.auth_failure_window_minutes),
        "latency_metric": kql_string(settings.proxy_latency_metric),
        "export_metric": kql_string(settings.export_unauthenticated_metric),
    }
    return {key: render(text, settings, **values) for key, text in QUERIES.items()}


@dataclass
class QueryOutcome:
    """Rows of one query, or why there are none to trust."""

    rows: list[dict] | None
    problem: str = ""

    @property
    def ok(self) -> bool:
        return self.rows is not None and not self.problem


def run_query(
    client, settings: Settings, text: str, window: tuple[datetime, datetime]
) -> QueryOutcome:
    """Run one query; a partial result or an error is never taken as data."""
    options = logs_call_options(settings)
    try:
        if settings.logs_resource_id:
            response = client.query_resource(
                settings.logs_resource_id,
                text,
                timespan=window,
                server_timeout=settings.logs_server_timeout_seconds,
                **options,
            )
        else:
            response = client.query_workspace(
                settings.logs_workspace_id,
                text,
                timespan=window,
                server_timeout=settings.logs_server_timeout_seconds,
                **options,
            )
    except (AzureError, ValueError) as error:
        # ValueError includes the JSONDecodeError that an empty 204 response raises.
        return QueryOutcome(
            None,
            f"query failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}",
        )
    if isinstance(response, LogsQueryPartialResult) or (
        response.status != LogsQueryStatus.SUCCESS
    ):
        message = getattr(getattr(response, "partial_error", None), "message", "")
        return QueryOutcome(None, f"partial result: {message[:300]}")
    table = response.tables[0] if response.tables else None
    if table is None:
        return QueryOutcome(None, "response has no table")
    rows = [dict(zip(table.columns, row)) for row in table.rows]
    return QueryOutcome(rows)


def run_all(
    settings: Settings, window: tuple[datetime, datetime], probe_agents: list[str]
) -> dict[str, QueryOutcome]:
    from concurrent.futures import ThreadPoolExecutor

    if not (settings.logs_resource_id or settings.logs_workspace_id):
        problem = "no UE_LOGS_RESOURCE_ID or UE_LOGS_WORKSPACE_ID is set"
        return {key: QueryOutcome(None, problem) for key in QUERIES}
    client = build_logs_client(settings)
    queries = build_queries(settings, probe_agents)
    # azure-core's HTTP connection pool keeps 10 connections per host.
    with ThreadPoolExecutor(max_workers=min(8, len(queries))) as pool:
        futures = {
            key: pool.submit(run_query, client, settings, text, window)
            for key, text in queries.items()
        }
        return {key: future.result() for key, future in futures.items()}


@task(
    name="query-telemetry",
    retries=2,
    retry_delay_seconds=[10, 30],
    cache_policy=NO_CACHE,
)
def query_telemetry(
    settings: Settings,
    orgs: list[str],
    window: tuple[datetime, datetime],
    probe_agents: list[str],
) -> list[CheckResult]:
    """Run every telemetry and monitor query once for all orgs and evaluate them."""
    logger = get_run_logger()
    outcomes = run_all(settings, window, probe_agents)
    # Read after the queries: onboarding registers a route before it sends the
    # event, so every synthetic row the queries returned is registered by now.
    synthetic = read_synthetic_routes(settings)
    for key, outcome in outcomes.items():
        if not outcome.ok:
            logger.warning("query %s: %s", key, outcome.problem)
    logger.info(
        "telemetry: %d queries over %s .. %s, %d synthetic route(s) registered",
        len(outcomes),
        window[0].isoformat(),
        window[1].isoformat(),
        len(synthetic),
    )
    return evaluate_telemetry(settings, orgs, outcomes, window[1], synthetic)


def read_synthetic_routes(settings: Settings) -> frozenset[str]:
    """Return the routes of onboarding's synthetic events, registered in Redis.

    Without Redis none are known, so synthetic events count as cross-org
    attempts. The check can then only fail more, never pass wrongly.
    """
    # tasks.telemetry_ingest imports this module, so it is imported here.
    from tasks.telemetry_ingest import recent_synthetic_routes

    try:
        return frozenset(recent_synthetic_routes(settings))
    except (redis.RedisError, ValueError) as error:
        get_run_logger().warning(
            "synthetic routes unavailable (%s); none left out", type(error).__name__
        )
        return frozenset()


def evaluate_telemetry(
    settings: Settings,
    orgs: list[str],
    outcomes: dict[str, QueryOutcome],
    window_end: datetime,
    synthetic_routes: frozenset[str] | None = None,
) -> list[CheckResult]:
    """Turn query outcomes into checks, all inconclusive unless liveness holds.

    A query whose rows do not have the expected columns or types makes its
    own checks inconclusive, not the whole task. Cross-org rows whose route
    is in `synthetic_routes` are left out; with None, nothing is left out and
    no `synthetic_left_out` count is recorded.
    """
    try:
        liveness = evaluate_liveness(settings, outcomes, window_end)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        liveness = inconclusive("telemetry.liveness",
                                f"malformed liveness result: {error!r}"[:300])
    dependent = evaluate_dependent(settings, orgs, outcomes, synthetic_routes)
    if liveness.status != Status.PASS:
        reason = f"telemetry liveness is {liveness.status.value}: {liveness.summary}"
        dependent = [
            inconclusive(check.id, reason, check.org, **check.observed)
            for check in dependent
        ]
    return [liveness] + dependent


def evaluate_liveness(
    settings: Settings, outcomes: dict[str, QueryOutcome], window_end: datetime
) -> CheckResult:
    """Pass when every expected event and metric arrived, the newest recently.

    Rows that stopped arriving long before the window's end would leave the
    rest of the window unobserved, and zero rows there prove nothing.
    """
    check_id = "telemetry.liveness"
    problems = [
        outcomes[key].problem
        for key in ("liveness_events", "liveness_metrics")
        if not outcomes[key].ok
    ]
    if problems:
        return inconclusive(check_id, "; ".join(problems))
    seen = {
        row["name"]: row["rows"]
        for key in ("liveness_events", "liveness_metrics")
        for row in outcomes[key].rows
        if row["rows"]
    }
    expected = settings.liveness_events + settings.liveness_metrics
    missing = [name for name in expected if not seen.get(name)]
    if missing:
        return inconclusive(
            check_id,
            "expected telemetry is not arriving: " + ", ".join(missing),
            seen=seen,
            missing=missing,
        )
    latest = {
        row["name"]: as_utc(row["latest"])
        for key in ("liveness_events", "liveness_metrics")
        for row in outcomes[key].rows
    }
    oldest_allowed = window_end - timedelta(minutes=settings.telemetry_max_age_minutes)
    stale = {name: latest[name].isoformat() for name in expected
             if latest[name] < oldest_allowed}
    if stale:
        return inconclusive(
            check_id,
            f"expected telemetry stopped more than {settings.telemetry_max_age_minutes}"
            " minutes before the window's end: " + ", ".join(stale),
            seen=seen,
            stale=stale,
        )
    return passed(check_id, "expected events and metrics are arriving", seen=seen)


def as_utc(value: object) -> datetime:
    """Read a datetime cell, which the client returns parsed or as ISO text."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(
        str(value).replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def evaluate_dependent(
    settings: Settings,
    orgs: list[str],
    outcomes: dict[str, QueryOutcome],
    synthetic_routes: frozenset[str] | None = None,
) -> list[CheckResult]:
    steps = [
        (("telemetry.ue_metrics",), None,
         lambda: [evaluate_ue_metrics(outcomes["ue_metrics"])]),
        (("telemetry.cross_org_events",), orgs,
         lambda: evaluate_cross_org(
             orgs, outcomes["cross_org"], synthetic_routes)),
        (("telemetry.auth_failures",), orgs,
         lambda: evaluate_auth(settings, orgs, outcomes["auth"])),
        (("telemetry.query_volume",), orgs,
         lambda: evaluate_volume(orgs, outcomes["query_volume"])),
        (MONITOR_CHECKS, None, lambda: evaluate_monitors(settings, outcomes)),
    ]
    checks = []
    for check_ids, scopes, evaluate in steps:
        try:
            checks += evaluate()
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            reason = f"malformed query result: {error!r}"[:300]
            checks += [inconclusive(check_id, reason, org)
                       for check_id in check_ids for org in (scopes or [None])]
    return checks


MONITOR_CHECKS = (
    "monitor.ue_pilot_health_degraded",
    "monitor.ue_rls_context_mismatch",
    "monitor.ue_auth_failure_rate",
    "monitor.ue_django_proxy_latency_p99",
    "monitor.ue_export_unauthenticated",
)


def evaluate_ue_metrics(outcome: QueryOutcome) -> CheckResult:
    check_id = "telemetry.ue_metrics"
    if not outcome.ok:
        return inconclusive(check_id, outcome.problem)
    counts = {row["name"]: row["rows"] for row in outcome.rows}
    if not counts:
        return inconclusive(check_id, "no ue_ metrics in the window")
    return passed(check_id, f"{len(counts)} ue_ metrics reporting", metrics=counts)


def evaluate_cross_org(
    orgs: list[str],
    outcome: QueryOutcome,
    synthetic_routes: frozenset[str] | None = None,
) -> list[CheckResult]:
    """Fail each org involved in a cross-org row, leaving out synthetic routes.

    `synthetic_left_out` counts, per org, the events of left-out rows
    (weighted by itemCount, as `attempts` is).
    """
    check_id = "telemetry.cross_org_events"
    if not outcome.ok:
        return [inconclusive(check_id, outcome.problem, org) for org in orgs]
    by_org: dict[str, list[dict]] = {org: [] for org in orgs}
    left_out = dict.fromkeys(orgs, 0)
    outside: list[dict] = []
    for row in outcome.rows:
        if synthetic_routes and row["route"] in synthetic_routes:
            for org in {row["orgId"], row["requestOrgId"]} & left_out.keys():
                left_out[org] += int(row["attempts"])
            continue
        attempt = {
            "orgId": row["orgId"],
            "requestOrgId": row["requestOrgId"],
            "route": row["route"],
            "attempts": row["attempts"],
            "first_seen": str(row["first_seen"]),
            "last_seen": str(row["last_seen"]),
        }
        involved = {row["orgId"], row["requestOrgId"]} & by_org.keys()
        for org in involved:
            by_org[org].append(attempt)
        if not involved:
            outside.append(attempt)

    checks = []
    for org, attempts in by_org.items():
        observed = {}
        if synthetic_routes is not None:
            observed["synthetic_left_out"] = left_out[org]
        if attempts:
            total = sum(a["attempts"] for a in attempts)
            checks.append(
                failed(
                    check_id,
                    f"{total} cross-org query attempt(s)",
                    org,
                    attempts=attempts,
                    **observed,
                )
            )
        else:
            checks.append(
                passed(check_id, "no cross-org query attempts", org, **observed)
            )
    if outside:
        checks.append(
            failed(
                check_id,
                "cross-org query attempts outside the pilot orgs",
                None,
                attempts=outside,
            )
        )
    return checks


def evaluate_auth(
    settings: Settings, orgs: list[str], outcome: QueryOutcome
) -> list[CheckResult]:
    check_id = "telemetry.auth_failures"
    if not outcome.ok:
        return [inconclusive(check_id, outcome.problem, org) for org in orgs]
    counts: dict[str, dict[str, int]] = {org: {} for org in orgs}
    for row in outcome.rows:
        if row["orgId"] in counts:
            counts[row["orgId"]][row["name"]] = int(row["events"])
    checks = []
    for org, seen in counts.items():
        failures = seen.get("auth_failure", 0)
        total = failures + seen.get("auth_success", 0)
        rate = failures / total if total else 0.0
        observed = {
            "auth_failure": failures,
            "role_check_failed": seen.get("role_check_failed", 0),
            "auth_success": seen.get("auth_success", 0),
            "failure_rate": round(rate, 4),
        }
        if rate > settings.auth_failure_rate_threshold:
            checks.append(
                failed(
                    check_id,
                    f"auth failure rate {rate:.1%} above "
                    f"{settings.auth_failure_rate_threshold:.0%}",
                    org,
                    **observed,
                )
            )
        else:
            checks.append(
                passed(check_id, f"auth failure rate {rate:.1%}", org, **observed)
            )
    return checks


def evaluate_volume(orgs: list[str], outcome: QueryOutcome) -> list[CheckResult]:
    check_id = "telemetry.query_volume"
    if not outcome.ok:
        return [inconclusive(check_id, outcome.problem, org) for org in orgs]
    volume = {row["orgId"]: row["queryCount"] for row in outcome.rows}
    checks = []
    for org in orgs:
        count = volume.get(org) or 0
        if count > 0:
            checks.append(passed(check_id, f"{count:g} queries", org, queryCount=count))
        else:
            checks.append(
                inconclusive(
                    check_id,
                    "no queries recorded for this org, so its telemetry "
                    "proves nothing about isolation",
                    org,
                    queryCount=0,
                )
            )
    return checks


def evaluate_monitors(
    settings: Settings, outcomes: dict[str, QueryOutcome]
) -> list[CheckResult]:
    """Evaluate the five alerts of the runbook's Monitoring table, with its thresholds."""
    return [
        monitor_readiness(settings, outcomes["monitor_readiness"]),
        monitor_total(
            "monitor.ue_rls_context_mismatch",
            outcomes["monitor_mismatch"],
            "context mismatches",
        ),
        monitor_auth_rate(settings, outcomes["monitor_auth_rate"]),
        monitor_latency(settings, outcomes["monitor_latency"]),
        monitor_total(
            "monitor.ue_export_unauthenticated",
            outcomes["monitor_export_unauthenticated"],
            "unauthenticated exports",
        ),
    ]


def monitor_readiness(settings: Settings, outcome: QueryOutcome) -> CheckResult:
    check_id = "monitor.ue_pilot_health_degraded"
    if not outcome.ok:
        return inconclusive(check_id, outcome.problem)
    if not any(row["total"] for row in outcome.rows):
        return inconclusive(
            check_id,
            "no readiness availability results in the "
            f"window (test {settings.readiness_test_name!r})",
        )
    worst = max(int(row["failures"]) for row in outcome.rows)
    observed = {
        "max_failures_per_bin": worst,
        "threshold": settings.readiness_failures_threshold,
        "bin_minutes": settings.readiness_window_minutes,
    }
    if worst >= settings.readiness_failures_threshold:
        return failed(
            check_id,
            f"readiness failed {worst}x within {settings.readiness_window_minutes} min",
            **observed,
        )
    return passed(check_id, "readiness probe healthy", **observed)


def monitor_total(check_id: str, outcome: QueryOutcome, label: str) -> CheckResult:
    if not outcome.ok:
        return inconclusive(check_id, outcome.problem)
    total = sum(float(row["total"] or 0) for row in outcome.rows)
    if total > 0:
        return failed(check_id, f"{total:g} {label} (threshold: any)", total=total)
    return passed(check_id, f"no {label}", total=0)


def monitor_auth_rate(settings: Settings, outcome: QueryOutcome) -> CheckResult:
    check_id = "monitor.ue_auth_failure_rate"
    if not outcome.ok:
        return inconclusive(check_id, outcome.problem)
    bins = [row for row in outcome.rows if row["total"]]
    if not bins:
        return inconclusive(check_id, "no authentication events in the window")
    worst = max(row["failures"] / row["total"] for row in bins)
    observed = {
        "max_rate": round(worst, 4),
        "bins": len(bins),
        "threshold": settings.auth_failure_rate_threshold,
    }
    if worst > settings.auth_failure_rate_threshold:
        return failed(check_id, f"auth failure rate reached {worst:.1%}", **observed)
    return passed(check_id, f"auth failure rate at most {worst:.1%}", **observed)


def monitor_latency(settings: Settings, outcome: QueryOutcome) -> CheckResult:
    check_id = "monitor.ue_django_proxy_latency_p99"
    if not outcome.ok:
        return inconclusive(check_id, outcome.problem)
    bins = [row for row in outcome.rows if row["measurements"]]
    if not bins:
        return inconclusive(check_id, "no proxy latency measurements in the window")
    worst = max(float(row["p99"]) for row in bins)
    observed = {
        "max_p99_ms": round(worst, 1),
        "bins": len(bins),
        "threshold_ms": settings.proxy_latency_p99_threshold_ms,
    }
    if worst > settings.proxy_latency_p99_threshold_ms:
        return failed(check_id, f"proxy latency p99 reached {worst:.0f} ms", **observed)
    return passed(check_id, f"proxy latency p99 at most {worst:.0f} ms", **observed)
