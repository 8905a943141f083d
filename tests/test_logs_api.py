"""Tests of the Logs query API stand-in through the real `LogsQueryClient`."""

from __future__ import annotations

import datetime as dt
import time

import httpx
import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError
from azure.monitor.query import LogsQueryClient, LogsQueryStatus

from ue_pilot.sandbox.logs_api import create_logs_app, parse_timespan
from ue_pilot.sandbox.servers import start_server
from ue_pilot.sandbox.telemetry import TelemetryStore

TOKEN = "sandbox-logs-token"
WORKSPACE_ID = "3f2c1f0e-0000-4000-8000-00000000a11c"
RESOURCE_ID = (
    "/subscriptions/00000000-0000-4000-8000-000000000001/resourceGroups/ue-pilot"
    "/providers/microsoft.insights/components/ue-web"
)
NOW = dt.datetime.now(dt.UTC)
OLD = NOW - dt.timedelta(days=3)
LAST_DAY = dt.timedelta(days=1)

RUNBOOK_CASES = [
    pytest.param(
        'customMetrics | where name startswith "ue_" '
        "| summarize count() by name, bin(timestamp, 5m) "
        "| order by timestamp desc | take 50",
        ("name",),
        {("ue_django_proxy_latency_ms",), ("ue_query_total",)},
        id="metric_counts",
    ),
    pytest.param(
        'customEvents | where name == "rls_context_set" '
        "| where tostring(customDimensions.orgId) "
        "!= tostring(customDimensions.requestOrgId) "
        "| summarize attempts = sum(itemCount) "
        "by orgId = tostring(customDimensions.orgId), "
        "requestOrgId = tostring(customDimensions.requestOrgId)",
        ("orgId", "requestOrgId", "attempts"),
        {("org_a", "org_b", 3)},
        id="cross_org_context",
    ),
    pytest.param(
        'customEvents | where name == "auth_failure" or name == "role_check_failed" '
        "| summarize n = sum(itemCount) "
        "by name, orgId = tostring(customDimensions.orgId)",
        ("name", "orgId", "n"),
        {("auth_failure", "org_a", 4), ("role_check_failed", "org_b", 2)},
        id="auth_failures",
    ),
    pytest.param(
        'customMetrics | where name == "ue_query_total" '
        "| extend orgId = tostring(customDimensions.orgId) "
        "| summarize queryCount = sum(valueSum) by orgId, bin(timestamp, 1h)",
        ("orgId",),
        {("org_a",), ("org_b",)},
        id="query_totals",
    ),
    pytest.param(
        'availabilityResults | where name == "ue-ready" '
        "| summarize failures = sumif(itemCount, success == false) "
        "by bin(timestamp, 5m)",
        ("failures",),
        {(3,)},
        id="readiness_failures",
    ),
    pytest.param(
        'customMetrics | where name == "ue_django_proxy_latency_ms" '
        "| summarize p99 = percentile(value, 99) by bin(timestamp, 5m)",
        ("p99",),
        {(4200.0,)},
        id="proxy_latency_p99",
    ),
]


class StaticTokenCredential:
    """A credential that returns one fixed bearer token without a network request."""

    def __init__(self, token: str) -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)


def seed(store: TelemetryStore) -> None:
    """Add rows that each runbook query reads, all at one instant five minutes ago."""
    at = (NOW - dt.timedelta(minutes=5)).replace(second=0, microsecond=0)
    store.track_event(
        "rls_context_set",
        {"orgId": "org_a", "requestOrgId": "org_b"},
        timestamp=at,
        item_count=3,
    )
    store.track_event("auth_failure", {"orgId": "org_a"}, timestamp=at, item_count=4)
    store.track_event(
        "role_check_failed", {"orgId": "org_b"}, timestamp=at, item_count=2
    )
    store.track_event("auth_failure", {"orgId": "org_old"}, timestamp=OLD)

    store.track_metric("ue_query_total", 10, {"orgId": "org_a"}, timestamp=at)
    store.track_metric("ue_query_total", 5, {"orgId": "org_b"}, timestamp=at)
    store.track_metric("ue_django_proxy_latency_ms", 4200, {}, timestamp=at)

    store.track_availability("ue-ready", False, 30.0, timestamp=at, item_count=3)
    store.track_availability("ue-ready", True, 12.0, timestamp=at)


@pytest.fixture(scope="module")
def server():
    store = TelemetryStore()
    seed(store)
    app = create_logs_app(
        store, token=TOKEN, workspace_id=WORKSPACE_ID, resource_id=RESOURCE_ID
    )
    running = start_server(app)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def partial_server():
    store = TelemetryStore()
    for index in range(10):
        store.track_metric("ue_query_total", index, {"orgId": "org_a"})
    app = create_logs_app(
        store,
        token=TOKEN,
        workspace_id=WORKSPACE_ID,
        resource_id=RESOURCE_ID,
        partial=True,
    )
    running = start_server(app)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return LogsQueryClient(StaticTokenCredential(TOKEN), endpoint=f"{server.url}/v1")


def query_scope(client: LogsQueryClient, scope: str, kql: str, timespan=LAST_DAY):
    """Send `kql` to the resource or the workspace scope of the stand-in."""
    if scope == "resource":
        return client.query_resource(
            RESOURCE_ID, kql, timespan=timespan, enforce_https=False
        )
    return client.query_workspace(
        WORKSPACE_ID, kql, timespan=timespan, enforce_https=False
    )


def project(table, names: tuple) -> set[tuple]:
    """Return the values of the named columns of each row, as a set of tuples."""
    return {tuple(row[name] for name in names) for row in table.rows}


@pytest.mark.parametrize("scope", ["resource", "workspace"])
@pytest.mark.parametrize(("kql", "names", "expected"), RUNBOOK_CASES)
def test_runbook_query(client, scope, kql, names, expected):
    """Each runbook query returns the expected rows on both scopes."""
    result = query_scope(client, scope, kql)

    assert project(result.tables[0], names) == expected


def test_result_status_success(client):
    """A full result has status SUCCESS."""
    result = query_scope(client, "resource", "customEvents | count")

    assert result.status == LogsQueryStatus.SUCCESS


def test_statistics_included(client):
    """include_statistics=True adds the query execution time to the result."""
    result = client.query_workspace(
        WORKSPACE_ID,
        "customEvents | count",
        timespan=None,
        include_statistics=True,
        enforce_https=False,
    )

    assert "executionTime" in result.statistics["query"]


def test_workspace_schema_events(client):
    """The workspace scope accepts the AppEvents names."""
    kql = (
        'AppEvents | where Name == "auth_failure" '
        "| summarize n = sum(ItemCount) by org = tostring(Properties.orgId)"
    )

    result = query_scope(client, "workspace", kql)

    assert project(result.tables[0], ("org", "n")) == {("org_a", 4)}


def test_workspace_schema_metrics(client):
    """AppMetrics carries the metric sums under Sum."""
    kql = 'AppMetrics | where Name == "ue_query_total" | summarize total = sum(Sum)'

    result = query_scope(client, "workspace", kql)

    assert project(result.tables[0], ("total",)) == {(15.0,)}


def test_workspace_schema_availability(client):
    """AppAvailabilityResults carries availability rows under Success."""
    kql = (
        "AppAvailabilityResults | where Success == false "
        "| summarize n = sum(ItemCount)"
    )

    result = query_scope(client, "workspace", kql)

    assert project(result.tables[0], ("n",)) == {(3,)}


def test_timespan_excludes_old_rows(client):
    """A one-day timespan hides the event from three days ago."""
    kql = 'customEvents | where name == "auth_failure" | count'

    result = query_scope(client, "resource", kql, timespan=LAST_DAY)

    assert project(result.tables[0], ("Count",)) == {(1,)}


def test_no_timespan_returns_all(client):
    """Without a timespan every row is visible."""
    kql = 'customEvents | where name == "auth_failure" | count'

    result = query_scope(client, "resource", kql, timespan=None)

    assert project(result.tables[0], ("Count",)) == {(2,)}


def test_timespan_start_end(client):
    """A (start, end) timespan around the old event returns only that event."""
    kql = (
        'customEvents | where name == "auth_failure" '
        "| project orgId = tostring(customDimensions.orgId)"
    )
    timespan = (OLD - dt.timedelta(hours=1), OLD + dt.timedelta(hours=1))

    result = query_scope(client, "workspace", kql, timespan=timespan)

    assert project(result.tables[0], ("orgId",)) == {("org_old",)}


def test_timespan_start_duration(client):
    """A (start, duration) timespan after the old event excludes it."""
    kql = 'customEvents | where name == "auth_failure" | count'
    timespan = (NOW - dt.timedelta(hours=2), dt.timedelta(hours=3))

    result = query_scope(client, "workspace", kql, timespan=timespan)

    assert project(result.tables[0], ("Count",)) == {(1,)}


def test_datetime_column_parsed(client):
    """The client parses datetime cells into aware datetimes."""
    kql = 'customEvents | where name == "role_check_failed" | project timestamp'

    result = query_scope(client, "resource", kql)

    assert result.tables[0].rows[0]["timestamp"].tzinfo is not None


def test_dynamic_column_object(client):
    """Dynamic cells arrive as JSON objects."""
    kql = 'customEvents | where name == "role_check_failed" | project customDimensions'

    result = query_scope(client, "resource", kql)

    assert result.tables[0].rows[0]["customDimensions"] == {"orgId": "org_b"}


def test_resource_id_case_insensitive(client):
    """A resource id in other letter case finds the same resource."""
    result = client.query_resource(
        RESOURCE_ID.upper(), "customEvents | count", timespan=None, enforce_https=False
    )

    assert result.status == LogsQueryStatus.SUCCESS


def test_partial_result_status(partial_server):
    """With partial on, the client returns a partial result."""
    client = LogsQueryClient(StaticTokenCredential(TOKEN), endpoint=partial_server.url)

    result = client.query_workspace(
        WORKSPACE_ID, "customMetrics", timespan=LAST_DAY, enforce_https=False
    )

    assert result.status == LogsQueryStatus.PARTIAL


def test_partial_result_error_code(partial_server):
    """The partial result carries a PartialError."""
    client = LogsQueryClient(StaticTokenCredential(TOKEN), endpoint=partial_server.url)

    result = client.query_workspace(
        WORKSPACE_ID, "customMetrics", timespan=LAST_DAY, enforce_https=False
    )

    assert result.partial_error.code == "PartialError"


def test_partial_result_half_rows(partial_server):
    """The partial result contains half of the rows."""
    client = LogsQueryClient(StaticTokenCredential(TOKEN), endpoint=partial_server.url)

    result = client.query_resource(
        RESOURCE_ID, "customMetrics", timespan=LAST_DAY, enforce_https=False
    )

    assert len(result.partial_data[0].rows) == 5


def test_bad_query_status(client):
    """Invalid KQL raises HttpResponseError with status 400."""
    with pytest.raises(HttpResponseError) as caught:
        query_scope(client, "workspace", "customEvents | wherex")

    assert caught.value.status_code == 400


def test_bad_query_inner_code(client):
    """The 400 error names the KQL syntax error as its inner error."""
    with pytest.raises(HttpResponseError) as caught:
        query_scope(client, "workspace", "customEvents | wherex")

    assert '"code": "SyntaxError"' in caught.value.message


def test_dynamic_comparison_status(client):
    """Comparing two dynamic values is rejected with status 400."""
    kql = "customEvents | where customDimensions.orgId != customDimensions.requestOrgId"

    with pytest.raises(HttpResponseError) as caught:
        query_scope(client, "resource", kql)

    assert caught.value.status_code == 400


def test_wrong_token_forbidden(server):
    """A wrong bearer token is rejected with 403, as the service does."""
    client = LogsQueryClient(StaticTokenCredential("wrong"), endpoint=server.url)

    with pytest.raises(HttpResponseError) as caught:
        query_scope(client, "workspace", "customEvents | count")

    assert caught.value.status_code == 403


def test_missing_token_status(server):
    """A request without a bearer token is rejected with 401."""
    url = f"{server.url}/v1/workspaces/{WORKSPACE_ID}/query"

    response = httpx.post(url, json={"query": "customEvents | count"})

    assert response.status_code == 401


def test_missing_token_code(server):
    """The 401 body has the Azure error code AuthenticationFailed."""
    url = f"{server.url}/v1/workspaces/{WORKSPACE_ID}/query"

    response = httpx.post(url, json={"query": "customEvents | count"})

    assert response.json()["error"]["code"] == "AuthenticationFailed"


def test_unknown_workspace_status(client):
    """An unknown workspace id is rejected with 404."""
    with pytest.raises(HttpResponseError) as caught:
        client.query_workspace(
            "00000000-0000-0000-0000-000000000000",
            "customEvents | count",
            timespan=None,
            enforce_https=False,
        )

    assert caught.value.status_code == 404


def test_unknown_resource_status(client):
    """An unknown resource id is rejected with 404."""
    other = RESOURCE_ID.replace("ue-web", "other-app")

    with pytest.raises(HttpResponseError) as caught:
        client.query_resource(
            other, "customEvents | count", timespan=None, enforce_https=False
        )

    assert caught.value.status_code == 404


def test_invalid_timespan_status(server):
    """A timespan that is not ISO 8601 is rejected with 400."""
    url = f"{server.url}/v1/workspaces/{WORKSPACE_ID}/query"
    body = {"query": "customEvents | count", "timespan": "yesterday"}

    response = httpx.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 400


def test_stats_counts_queries(server, client):
    """GET /sandbox/stats counts each query request served."""
    before = httpx.get(f"{server.url}/sandbox/stats").json()["queries"]

    query_scope(client, "resource", "customEvents | count")
    query_scope(client, "workspace", "customEvents | count")

    after = httpx.get(f"{server.url}/sandbox/stats").json()["queries"]
    assert after - before == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(None, (None, None), id="none"),
        pytest.param(
            "2024-05-01T00:00:00Z/2024-05-02T00:00:00Z",
            (
                dt.datetime(2024, 5, 1, tzinfo=dt.UTC),
                dt.datetime(2024, 5, 2, tzinfo=dt.UTC),
            ),
            id="start_end",
        ),
        pytest.param(
            "2024-05-01T00:00:00.000Z/PT3600.0S",
            (
                dt.datetime(2024, 5, 1, tzinfo=dt.UTC),
                dt.datetime(2024, 5, 1, 1, tzinfo=dt.UTC),
            ),
            id="start_duration",
        ),
        pytest.param(
            "PT1H/2024-05-01T01:00:00Z",
            (
                dt.datetime(2024, 5, 1, tzinfo=dt.UTC),
                dt.datetime(2024, 5, 1, 1, tzinfo=dt.UTC),
            ),
            id="duration_end",
        ),
        pytest.param(
            "P1D",
            (
                dt.datetime(2024, 4, 30, tzinfo=dt.UTC),
                dt.datetime(2024, 5, 1, tzinfo=dt.UTC),
            ),
            id="duration",
        ),
    ],
)
def test_parse_timespan(text, expected):
    """parse_timespan reads each ISO 8601 interval form the client sends."""
    now = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)

    assert parse_timespan(text, now) == expected
