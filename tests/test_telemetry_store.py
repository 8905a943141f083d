"""Tests of the in-memory Application Insights stand-in, `TelemetryStore`."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest

from ue_pilot.sandbox.telemetry import KqlQueryError, TelemetryStore

# All fresh rows lie within four minutes after BASE, so one 5-minute bin and one
# 1-hour bin hold each series. BASE is on the hour and one hour in the past.
BASE = dt.datetime.now(dt.UTC).replace(
    minute=0, second=0, microsecond=0
) - dt.timedelta(hours=1)
OLD = BASE - dt.timedelta(days=3)
WINDOW = (BASE - dt.timedelta(hours=1), BASE + dt.timedelta(hours=1))

RUNBOOK_CASES = [
    pytest.param(
        'customMetrics | where name startswith "ue_" '
        "| summarize count() by name, bin(timestamp, 5m) "
        "| order by timestamp desc | take 50",
        ("name", "count_"),
        {("ue_django_proxy_latency_ms", 100), ("ue_query_total", 3)},
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
        ("orgId", "queryCount"),
        {("org_a", 30.0), ("org_b", 5.0)},
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
        {(99.0,)},
        id="proxy_latency_p99",
    ),
]

FUNCTION_CASES = [
    pytest.param(
        'customEvents | summarize n = countif(name == "auth_failure")', 1, id="countif"
    ),
    pytest.param(
        'customEvents | summarize n = sumif(itemCount, name == "auth_failure")',
        4,
        id="sumif",
    ),
    pytest.param(
        'union customEvents, availabilityResults | where name == "ue-ready" | count',
        5,
        id="union",
    ),
    pytest.param("customEvents | summarize n = dcount(name)", 3, id="dcount"),
    pytest.param(
        'customEvents | summarize n = sum(iff(name == "auth_failure", 1, 0))',
        1,
        id="iff",
    ),
    pytest.param(
        "customEvents | summarize n = sum(todouble(itemCount))", 14.0, id="todouble"
    ),
    pytest.param(
        "customEvents | summarize n = sum(toreal(itemCount))", 14.0, id="toreal"
    ),
]


def seed(store: TelemetryStore) -> None:
    """Add the rows every test in this module reads."""
    at = BASE + dt.timedelta(minutes=1)
    store.track_event(
        "rls_context_set",
        {"orgId": "org_a", "requestOrgId": "org_b"},
        timestamp=at,
        item_count=3,
    )
    store.track_event(
        "rls_context_set",
        {"orgId": "org_a", "requestOrgId": "org_a"},
        timestamp=at,
        item_count=5,
    )
    store.track_event("auth_failure", {"orgId": "org_a"}, timestamp=at, item_count=4)
    store.track_event(
        "role_check_failed", {"orgId": "org_b"}, timestamp=at, item_count=2
    )
    store.track_event("auth_failure", {"orgId": "org_old"}, timestamp=OLD, item_count=9)

    for org_id, value in (("org_a", 10), ("org_a", 20), ("org_b", 5)):
        store.track_metric("ue_query_total", value, {"orgId": org_id}, timestamp=at)
    for value in range(1, 101):
        moment = BASE + dt.timedelta(seconds=2 * value)
        store.track_metric("ue_django_proxy_latency_ms", value, {}, timestamp=moment)
    store.track_metric("process_cpu_percent", 12.5, {}, timestamp=at)

    store.track_availability("ue-ready", False, 30.0, timestamp=at, item_count=1)
    store.track_availability("ue-ready", False, 31.0, timestamp=at, item_count=2)
    for _ in range(3):
        store.track_availability("ue-ready", True, 12.0, timestamp=at)


@pytest.fixture(scope="module")
def store() -> TelemetryStore:
    store = TelemetryStore()
    seed(store)
    return store


def project(columns: list[dict], rows: list[list], names: tuple) -> set[tuple]:
    """Return the values of the named columns of each row, as a set of tuples."""
    positions = [[column["name"] for column in columns].index(name) for name in names]
    return {tuple(row[position] for position in positions) for row in rows}


@pytest.mark.parametrize(("kql", "names", "expected"), RUNBOOK_CASES)
def test_runbook_query(store, kql, names, expected):
    """Each runbook query returns the expected aggregates over the seeded rows."""
    columns, rows = store.query(kql, *WINDOW)

    assert project(columns, rows, names) == expected


@pytest.mark.parametrize(("kql", "expected"), FUNCTION_CASES)
def test_kql_function(store, kql, expected):
    """Each KQL function the audit may use evaluates to the expected value."""
    _, rows = store.query(kql, *WINDOW)

    assert rows == [[expected]]


def test_percentilew_unsupported(store):
    """A function duckdb-kql does not translate raises KqlQueryError."""
    kql = "customMetrics | summarize p = percentilew(value, itemCount, 99)"

    with pytest.raises(KqlQueryError) as caught:
        store.query(kql, *WINDOW)

    assert caught.value.code == "SemanticError"


def test_row_counts(store):
    """row_counts returns the stored rows of each classic table."""
    assert store.row_counts() == {
        "customEvents": 5,
        "customMetrics": 104,
        "availabilityResults": 5,
    }


def test_metric_single_measurement(store):
    """A tracked metric has value, valueSum, valueMin and valueMax equal."""
    kql = (
        'customMetrics | where name == "process_cpu_percent" '
        "| project value, valueSum, valueMin, valueMax, valueCount"
    )

    _, rows = store.query(kql, *WINDOW)

    assert rows == [[12.5, 12.5, 12.5, 12.5, 1]]


def test_timespan_excludes_old_rows(store):
    """Rows outside [start, end] are invisible to the query."""
    kql = 'customEvents | where name == "auth_failure" | count'

    _, rows = store.query(kql, *WINDOW)

    assert rows == [[1]]


def test_open_timespan_returns_all(store):
    """A query without bounds reads every row."""
    kql = 'customEvents | where name == "auth_failure" | count'

    _, rows = store.query(kql, None, None)

    assert rows == [[2]]


def test_end_bound_inclusive(store):
    """A row stamped exactly at the end of the timespan is included."""
    kql = 'customEvents | where name == "auth_failure" | count'

    _, rows = store.query(kql, OLD - dt.timedelta(hours=1), OLD)

    assert rows == [[1]]


def test_workspace_event_names(store):
    """AppEvents exposes customEvents rows under the workspace column names."""
    kql = (
        'AppEvents | where Name == "rls_context_set" '
        "| summarize n = sum(ItemCount) by org = tostring(Properties.orgId)"
    )

    _, rows = store.query(kql, *WINDOW)

    assert rows == [["org_a", 8]]


def test_workspace_metric_names(store):
    """AppMetrics exposes valueSum and valueCount as Sum and Count."""
    kql = (
        'AppMetrics | where Name == "ue_query_total" '
        "| summarize s = sum(Sum), c = sum(Count)"
    )

    _, rows = store.query(kql, *WINDOW)

    assert rows == [[35.0, 3]]


def test_workspace_availability_names(store):
    """AppAvailabilityResults exposes success and duration as Success and DurationMs."""
    kql = (
        "AppAvailabilityResults | where Success == false "
        "| summarize d = max(DurationMs)"
    )

    _, rows = store.query(kql, *WINDOW)

    assert rows == [[31.0]]


def test_column_types(store):
    """Columns carry Log Analytics type names."""
    kql = "customEvents | take 1 | project timestamp, name, customDimensions, itemCount"

    columns, _ = store.query(kql, *WINDOW)

    types = [column["type"] for column in columns]
    assert types == ["datetime", "string", "dynamic", "int"]


def test_datetime_iso_utc(store):
    """Datetime values are ISO 8601 UTC strings ending in Z."""
    kql = 'customEvents | where name == "role_check_failed" | project timestamp'

    _, rows = store.query(kql, *WINDOW)

    expected = (BASE + dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert rows == [[expected]]


def test_dynamic_value_parsed(store):
    """Dynamic values come back as parsed JSON objects."""
    kql = 'customEvents | where name == "role_check_failed" | project customDimensions'

    _, rows = store.query(kql, *WINDOW)

    assert rows == [[{"orgId": "org_b"}]]


def test_timespan_value_format(store):
    """Timespan values use Kusto's hh:mm:ss form."""
    _, rows = store.query("print t = 90m", None, None)

    assert rows == [["01:30:00"]]


def test_dynamic_comparison_rejected(store):
    """Comparing two dynamic values raises KqlQueryError, as Kusto does."""
    kql = "customEvents | where customDimensions.orgId != customDimensions.requestOrgId"

    with pytest.raises(KqlQueryError) as caught:
        store.query(kql, *WINDOW)

    assert caught.value.code == "SemanticError"


def test_syntax_error_code(store):
    """Text that does not parse raises KqlQueryError with code SyntaxError."""
    with pytest.raises(KqlQueryError) as caught:
        store.query("customEvents | wherex", *WINDOW)

    assert caught.value.code == "SyntaxError"


def test_unknown_table_rejected(store):
    """A table the store does not have raises KqlQueryError with code SemanticError."""
    with pytest.raises(KqlQueryError) as caught:
        store.query("requests | take 1", *WINDOW)

    assert caught.value.code == "SemanticError"


def test_write_command_rejected(store):
    """An ingestion command raises KqlQueryError instead of writing."""
    with pytest.raises(KqlQueryError):
        store.query(".set-or-replace Copy <| customEvents", *WINDOW)


def test_disabled_store_drops_rows():
    """With enabled False every track call drops its row."""
    store = TelemetryStore()
    store.enabled = False

    store.track_event("auth_failure", {"orgId": "org_a"})
    store.track_metric("ue_query_total", 1.0, {})
    store.track_availability("ue-ready", True, 5.0)

    assert store.row_counts() == {
        "customEvents": 0,
        "customMetrics": 0,
        "availabilityResults": 0,
    }


def test_bulk_insert_fast():
    """Tracking and flushing 100,000 rows takes less than five seconds."""
    store = TelemetryStore()
    started = time.perf_counter()

    for index in range(100_000):
        store.track_metric("ue_query_total", 1.0, {"orgId": f"org_{index % 7}"})
    store.flush()

    assert time.perf_counter() - started < 5.0


def test_concurrent_tracking_and_queries():
    """Rows tracked from several threads while others query are all stored."""
    store = TelemetryStore()
    errors = []

    def track(thread_index: int) -> None:
        for index in range(5_000):
            store.track_event("ping", {"thread": thread_index, "index": index})

    def query() -> None:
        for _ in range(20):
            try:
                store.query("customEvents | count", None, None)
            except Exception as error:  # noqa: BLE001 - collected for the assert
                errors.append(error)

    threads = [threading.Thread(target=track, args=(index,)) for index in range(4)]
    threads += [threading.Thread(target=query) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert store.row_counts()["customEvents"] == 20_000
