"""Synthetic traffic in the telemetry store, read back with the audit's KQL shapes."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from ue_pilot.sandbox.telemetry import TelemetryStore
from ue_pilot.sandbox.traffic import TrafficGenerator, org_stride, seed_history

ORGS = ["org_alpha01", "org_bravo02", "org_charlie03"]
# A whole hour, so the 120 seeded minutes fill 24 complete 5-minute bins.
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
START = NOW - timedelta(minutes=120)
BINS = 24


def seeded(*faults: str, orgs: list[str] = ORGS) -> TelemetryStore:
    store = TelemetryStore()
    seed_history(store, orgs, set(faults), now=NOW)
    return store


def query(store: TelemetryStore, kql: str) -> list[list]:
    _, rows = store.query(kql, START, NOW)
    return rows


AUTH_RATE = """customEvents
| where name in ("auth_failure", "auth_success")
| summarize failures = sum(iff(name == "auth_failure", itemCount, 0)),
    total = sum(itemCount) by bin(timestamp, 5m)
| extend rate = todouble(failures) / total
| project rate"""

LATENCY_P99 = """customMetrics
| where name == "ue_django_proxy_latency_ms"
| summarize p99 = percentile(valueMax, 99) by bin(timestamp, 5m)
| project p99"""

MISMATCHES = """customEvents
| where name == "rls_context_set"
| extend orgId = tostring(customDimensions.orgId),
    requestOrgId = tostring(customDimensions.requestOrgId)
| where orgId != requestOrgId
| summarize attempts = sum(itemCount) by orgId, requestOrgId"""

READINESS = """availabilityResults
| where name == "ue-ready"
| summarize failures = sum(iff(success == false, itemCount, 0)),
    total = sum(itemCount) by bin(timestamp, 5m)
| order by timestamp asc
| project failures, total"""

ORG_BINS = """customEvents
| where name == "{name}"
| summarize by orgId = tostring(customDimensions.orgId), bin(timestamp, 5m)
| summarize bins = count() by orgId"""


@pytest.fixture(scope="module")
def clean() -> TelemetryStore:
    return seeded()


@pytest.mark.parametrize("name", ["auth_success", "rls_context_set"])
def test_clean_every_org_every_bin(clean, name):
    """Each org has the event in every 5-minute bin."""
    rows = query(clean, ORG_BINS.format(name=name))
    assert sorted(rows) == [[org, BINS] for org in ORGS]


def test_clean_query_metric_per_org(clean):
    """Each org's ue_query_total sums to its rls_context_set count."""
    metric = query(
        clean,
        'customMetrics | where name == "ue_query_total"'
        " | summarize total = sum(valueSum * itemCount)"
        " by orgId = tostring(customDimensions.orgId)",
    )
    events = query(
        clean,
        'customEvents | where name == "rls_context_set"'
        " | summarize total = sum(itemCount)"
        " by orgId = tostring(customDimensions.orgId)",
    )
    assert sorted(metric) == sorted(events)


def test_clean_no_mismatches(clean):
    """Clean traffic sets every context to the request's org."""
    assert query(clean, MISMATCHES) == []


def test_clean_auth_rate_low(clean):
    """Clean traffic stays under 10 % auth failures in every bin."""
    rates = [rate for (rate,) in query(clean, AUTH_RATE)]
    assert len(rates) == BINS
    assert max(rates) < 0.10


def test_clean_latency_p99_low(clean):
    """Clean latency p99 stays under 3 s in every bin."""
    p99s = [p99 for (p99,) in query(clean, LATENCY_P99)]
    assert len(p99s) == BINS
    assert max(p99s) < 3000


def test_clean_latency_range(clean):
    """Clean latency measurements lie between 50 and 400 ms."""
    rows = query(
        clean,
        'customMetrics | where name == "ue_django_proxy_latency_ms"'
        " | summarize low = min(value), high = max(value)",
    )
    assert rows[0][0] >= 50
    assert rows[0][1] <= 400


def test_clean_readiness_succeeds(clean):
    """Every minute has one successful ue-ready availability row."""
    rows = query(clean, READINESS)
    assert rows == [[0, 5]] * BINS


def test_clean_sampled_rows(clean):
    """Some event rows represent several events (itemCount above 1)."""
    rows = query(clean, "customEvents | summarize top = max(itemCount)")
    assert rows[0][0] > 1


def test_clean_no_alarm_metrics(clean):
    """Clean traffic records no unauthenticated export and no context mismatch."""
    rows = query(
        clean,
        "customMetrics"
        ' | where name in ("ue_export_unauthenticated", "ue_rls_context_mismatch")'
        " | count",
    )
    assert rows == [[0]]


def test_clean_user_agents_are_browsers(clean):
    """Simulated users send browser User-Agent strings."""
    rows = query(
        clean,
        'customEvents | where name == "auth_success"'
        " | summarize by agent = tostring(customDimensions.userAgent)",
    )
    assert all(agent.startswith("Mozilla/5.0") for (agent,) in rows)


def test_clean_rows_inside_window(clean):
    """No row lies outside the seeded 120 minutes."""
    counts = clean.row_counts()
    _, rows = clean.query("customEvents | count", START, NOW)
    assert rows == [[counts["customEvents"]]]


def test_seed_deterministic():
    """Seeding twice with the same inputs gives the same rows."""
    kql = (
        "customEvents | summarize n = sum(itemCount)"
        " by name, tostring(customDimensions.userId), timestamp"
        " | order by timestamp asc, name asc"
    )
    assert query(seeded(), kql) == query(seeded(), kql)


def test_cross_org_events_fault():
    """Fault cross-org-events records foreign contexts for two orgs."""
    rows = query(seeded("cross-org-events"), MISMATCHES)
    pairs = sorted((org, request_org) for org, request_org, _ in rows)
    assert pairs == [("org_bravo02", "org_alpha01"), ("org_charlie03", "org_bravo02")]


def test_cross_org_events_metric():
    """Fault cross-org-events records ue_rls_context_mismatch."""
    rows = query(
        seeded("cross-org-events"),
        'customMetrics | where name == "ue_rls_context_mismatch"'
        " | summarize total = sum(valueSum * itemCount)",
    )
    assert rows[0][0] > 0


def test_cross_org_events_single_org():
    """With one org the foreign context is an org outside the pilot."""
    rows = query(seeded("cross-org-events", orgs=ORGS[:1]), MISMATCHES)
    assert {(org, request_org) for org, request_org, _ in rows} == {
        ("org_outside0001", "org_alpha01")
    }


def test_auth_failure_storm_fault():
    """Fault auth-failure-storm puts auth failures above 10 % in every bin."""
    rates = [rate for (rate,) in query(seeded("auth-failure-storm"), AUTH_RATE)]
    assert len(rates) == BINS
    assert min(rates) > 0.10


def test_auth_failure_storm_rate():
    """Fault auth-failure-storm makes about a quarter of requests fail."""
    rates = [rate for (rate,) in query(seeded("auth-failure-storm"), AUTH_RATE)]
    assert max(abs(rate - 0.25) for rate in rates) < 0.02


def test_slow_proxy_fault():
    """Fault slow-proxy puts the latency p99 above 3 s in every bin."""
    p99s = [p99 for (p99,) in query(seeded("slow-proxy"), LATENCY_P99)]
    assert len(p99s) == BINS
    assert min(p99s) > 3000


def test_slow_proxy_share():
    """Fault slow-proxy makes at least 3 % of measurements 3.5 to 6 s."""
    rows = query(
        seeded("slow-proxy"),
        'customMetrics | where name == "ue_django_proxy_latency_ms"'
        " | summarize slow = countif(value >= 3500 and value <= 6000), total = count()",
    )
    slow, total = rows[0]
    assert slow / total >= 0.03


def test_readiness_down_fault():
    """Fault readiness-down fails the readiness rows of the last 15 minutes only."""
    rows = query(seeded("readiness-down"), READINESS)
    assert rows == [[0, 5]] * (BINS - 3) + [[5, 5]] * 3


def test_no_telemetry_fault():
    """Fault no-telemetry writes nothing."""
    store = seeded("no-telemetry")
    assert sum(store.row_counts().values()) == 0


def test_stride_small():
    """Up to 400 orgs get rows every minute."""
    assert org_stride(400) == 1


def test_stride_capped():
    """The stride never exceeds 5 minutes, so each org appears in every 5-minute bin."""
    assert org_stride(10_000) == 5


def test_seed_1000_orgs_fast():
    """1,000 orgs over 120 minutes seed in seconds and below 200,000 rows."""
    orgs = [f"org_scale{index:04d}" for index in range(1000)]
    store = TelemetryStore()
    started = time.perf_counter()
    rows = seed_history(store, orgs, {"auth-failure-storm"}, now=NOW)
    elapsed = time.perf_counter() - started
    print(f"\nseed_history, 1000 orgs x 120 min: {rows} rows in {elapsed:.2f} s")
    assert rows < 200_000
    assert sum(store.row_counts().values()) == rows
    # NOTE: the bound is a generous guess. This test measured about 1.6 s on 2 cores.
    assert elapsed < 30


def test_seed_1000_orgs_every_bin():
    """With 1,000 orgs every org still appears in every 5-minute bin."""
    orgs = [f"org_scale{index:04d}" for index in range(1000)]
    store = TelemetryStore()
    seed_history(store, orgs, set(), now=NOW)
    rows = query(
        store,
        ORG_BINS.format(name="auth_success")
        + " | summarize low = min(bins), n = count()",
    )
    assert rows == [[BINS, 1000]]


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_generator_adds_minutes():
    """The generator writes a minute of traffic at every interval."""
    store = TelemetryStore()
    generator = TrafficGenerator(store, ORGS, set(), interval_seconds=0.1)
    generator.start()
    try:
        ticked = wait_for(lambda: generator.ticks >= 2)
    finally:
        generator.stop()
    assert ticked
    assert store.row_counts()["availabilityResults"] >= 2


def test_generator_rows_are_recent():
    """Generated rows carry timestamps within the last minute."""
    store = TelemetryStore()
    generator = TrafficGenerator(store, ORGS, set())
    generator.tick()
    now = datetime.now(UTC)
    _, rows = store.query("customEvents | count", now - timedelta(minutes=1), now)
    assert rows[0][0] == store.row_counts()["customEvents"]


def test_generator_reads_new_orgs():
    """An org appended to the list gets traffic from the next tick."""
    store = TelemetryStore()
    orgs = list(ORGS)
    generator = TrafficGenerator(store, orgs, set())
    orgs.append("org_delta04")
    generator.tick()
    _, rows = store.query(
        "customEvents"
        ' | where tostring(customDimensions.orgId) == "org_delta04" | count',
        None,
        None,
    )
    assert rows[0][0] > 0


def test_generator_readiness_down():
    """Under readiness-down every generated readiness row fails."""
    store = TelemetryStore()
    generator = TrafficGenerator(store, ORGS, {"readiness-down"})
    generator.tick()
    _, rows = store.query(
        "availabilityResults | summarize failed = countif(success == false)",
        None,
        None,
    )
    assert rows == [[1]]


def test_generator_stops():
    """stop() ends the thread, and a second stop() is harmless."""
    generator = TrafficGenerator(TelemetryStore(), ORGS, set(), interval_seconds=0.05)
    generator.start()
    thread = generator._thread
    generator.stop()
    generator.stop()
    assert thread is not None
    assert not thread.is_alive()
