"""Synthetic user traffic written straight into the sandbox telemetry store.

A live pilot has hours of telemetry from real users before any audit runs.
`seed_history` writes that history at once and `TrafficGenerator` keeps adding
one minute of it per interval, so the audit's KQL queries find the rows they
would find in Application Insights.

Rows are pre-aggregated the way adaptive sampling stores them: one event row
with `itemCount` k represents k requests. Each org gets one set of rows every
`org_stride` minutes, so 1,000 orgs over 120 minutes stay near 125,000 rows.
Every choice is drawn from a generator seeded with the minute, so the same
inputs always produce the same rows.

Telemetry faults (see `faults.py`): `cross-org-events`, `auth-failure-storm`,
`slow-proxy`, `readiness-down`. Under `no-telemetry` nothing is written.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from ue_pilot.settings import RUNBOOK_READINESS_TEST

__all__ = ["TrafficGenerator", "emit_minute", "org_stride", "seed_history"]

logger = logging.getLogger(__name__)

# Orgs that get rows in one minute before the stride grows past 1.
ORGS_PER_MINUTE = 400
# Beyond this stride an org would miss whole 5-minute bins.
MAX_STRIDE = 5
REQUESTS_PER_ORG_MINUTE = (3, 6, 9, 12)
LATENCY_ROWS_PER_MINUTE = 40
# 2 of 40 rows (5 %) put the p99 of every 5-minute bin in the slow range.
SLOW_ROWS_PER_MINUTE = 2
NORMAL_LATENCY_MS = (50.0, 400.0)
SLOW_LATENCY_MS = (3500.0, 6000.0)
# Share of org rows that carry one failed sign-in (an expired session).
BASELINE_FAILURE_CHANCE = 0.1
READINESS_DOWN_MINUTES = 15
MISMATCH_OFFENDERS = 2

USER_ROUTES = (
    "/api/v2/rewards",
    "/api/v2/members",
    "/api/v2/rewards/export",
    "/api/v2/tax/cra/export",
    "/api/analytics/cross-org",
)
ADMIN_ROUTES = frozenset({"/api/analytics/cross-org"})
LATENCY_ROUTES = ("/api/health", "/api/ready", *USER_ROUTES)
BROWSER_USER_AGENTS = (
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36"
        " (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
    ),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15"
        " (KHTML, like Gecko) Version/17.4 Safari/605.1.15"
    ),
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
)


def org_stride(org_count: int) -> int:
    """Return the number of minutes between two sets of rows of one org.

    The stride grows with the org count to bound the rows per minute, up to
    `MAX_STRIDE`. Beyond `ORGS_PER_MINUTE * MAX_STRIDE` orgs the row count
    grows again.
    """
    return min(MAX_STRIDE, max(1, math.ceil(org_count / ORGS_PER_MINUTE)))


def seed_history(
    store: Any,
    org_ids: list[str],
    faults: set[str],
    *,
    now: datetime,
    minutes: int = 120,
) -> int:
    """Write `minutes` whole minutes of traffic ending at the minute of `now`.

    Under `readiness-down` the readiness rows of the last 15 minutes fail.
    Returns the number of rows written.
    """
    if "no-telemetry" in faults:
        return 0
    end = _utc(now).replace(second=0, microsecond=0)
    down_from = end - timedelta(minutes=READINESS_DOWN_MINUTES)
    rows = 0
    for offset in range(minutes, 0, -1):
        minute_start = end - timedelta(minutes=offset)
        readiness_failed = "readiness-down" in faults and minute_start >= down_from
        rows += emit_minute(
            store, org_ids, faults, minute_start, readiness_failed=readiness_failed
        )
    store_flush = getattr(store, "flush", None)
    if store_flush is not None:
        store_flush()
    logger.info(
        "seeded %d telemetry rows: %d orgs, %d minutes", rows, len(org_ids), minutes
    )
    return rows


def emit_minute(
    store: Any,
    org_ids: list[str],
    faults: set[str],
    minute_start: datetime,
    *,
    readiness_failed: bool,
) -> int:
    """Write one minute of traffic from `minute_start` and return the row count."""
    minute_index = int(minute_start.timestamp()) // 60
    rng = random.Random(minute_index)
    stride = org_stride(len(org_ids))
    rows = 0
    for position, org_id in enumerate(org_ids):
        if (minute_index + position) % stride == 0:
            rows += _emit_org_requests(store, rng, org_id, faults, minute_start, stride)
    rows += _emit_latency(store, rng, faults, minute_start)
    rows += _emit_readiness(store, rng, minute_start, failed=readiness_failed)
    if "cross-org-events" in faults:
        rows += _emit_context_mismatches(store, rng, org_ids, minute_start)
    return rows


def _emit_org_requests(
    store: Any,
    rng: random.Random,
    org_id: str,
    faults: set[str],
    minute_start: datetime,
    stride: int,
) -> int:
    """Write one org's sign-ins and queries, with item counts for `stride` minutes."""
    requests = rng.choice(REQUESTS_PER_ORG_MINUTE) * stride
    route = rng.choice(USER_ROUTES)
    user_id = _user_id(org_id, rng.randint(1, 20))
    user_agent = rng.choice(BROWSER_USER_AGENTS)
    timestamp = minute_start + timedelta(seconds=rng.uniform(0, 59))
    role = "admin" if route in ADMIN_ROUTES else "member"

    store.track_event(
        "auth_success",
        {
            "orgId": org_id,
            "userId": user_id,
            "route": route,
            "role": role,
            "userAgent": user_agent,
        },
        timestamp=timestamp,
        item_count=requests,
    )
    store.track_event(
        "rls_context_set",
        {"orgId": org_id, "requestOrgId": org_id, "userId": user_id, "route": route},
        timestamp=timestamp,
        item_count=requests,
    )
    store.track_metric(
        "ue_query_total",
        1,
        {"orgId": org_id, "route": route},
        timestamp=timestamp,
        item_count=requests,
    )

    # Under the storm a third as many failures as successes: 25 % of requests.
    if "auth-failure-storm" in faults:
        failures = requests // 3
    else:
        failures = 1 if rng.random() < BASELINE_FAILURE_CHANCE else 0
    if not failures:
        return 3
    store.track_event(
        "auth_failure",
        {
            "orgId": org_id,
            "route": route,
            "reason": "invalid_session",
            "userAgent": user_agent,
        },
        timestamp=timestamp,
        item_count=failures,
    )
    return 4


def _emit_latency(
    store: Any, rng: random.Random, faults: set[str], minute_start: datetime
) -> int:
    """Write single proxy latency measurements (itemCount 1), some slow under fault."""
    slow = SLOW_ROWS_PER_MINUTE if "slow-proxy" in faults else 0
    for index in range(LATENCY_ROWS_PER_MINUTE):
        bounds = SLOW_LATENCY_MS if index < slow else NORMAL_LATENCY_MS
        store.track_metric(
            "ue_django_proxy_latency_ms",
            round(rng.uniform(*bounds), 1),
            {"route": rng.choice(LATENCY_ROUTES)},
            timestamp=minute_start + timedelta(seconds=rng.uniform(0, 59)),
        )
    return LATENCY_ROWS_PER_MINUTE


def _emit_readiness(
    store: Any, rng: random.Random, minute_start: datetime, *, failed: bool
) -> int:
    """Write the minute's result of the readiness availability test."""
    store.track_availability(
        RUNBOOK_READINESS_TEST,
        not failed,
        round(rng.uniform(20.0, 120.0), 1),
        timestamp=minute_start + timedelta(seconds=30),
    )
    return 1


def _emit_context_mismatches(
    store: Any, rng: random.Random, org_ids: list[str], minute_start: datetime
) -> int:
    """Write, for the first two orgs, a query that ran under the next org's context.

    With a single org, the foreign context is an org id outside the pilot.
    """
    rows = 0
    for position, offender in enumerate(org_ids[:MISMATCH_OFFENDERS]):
        if len(org_ids) > 1:
            victim = org_ids[(position + 1) % len(org_ids)]
        else:
            victim = "org_outside0001"
        route = rng.choice(USER_ROUTES)
        timestamp = minute_start + timedelta(seconds=rng.uniform(0, 59))
        store.track_event(
            "rls_context_set",
            {
                "orgId": victim,
                "requestOrgId": offender,
                "userId": _user_id(offender, 1),
                "route": route,
            },
            timestamp=timestamp,
        )
        store.track_metric(
            "ue_rls_context_mismatch",
            1,
            {"orgId": victim, "requestOrgId": offender, "route": route},
            timestamp=timestamp,
        )
        rows += 2
    return rows


def _user_id(org_id: str, number: int) -> str:
    return f"user_{org_id.removeprefix('org_')}_{number:02d}"


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


class TrafficGenerator:
    """A daemon thread that writes one more minute of traffic every interval.

    `org_ids` and `faults` are read at every tick, so an org appended to the
    list (for example after `SandboxDatabase.add_org`) gets traffic from the
    next tick on. Each tick covers the minute that ends at the tick, so with
    an interval below 60 s consecutive ticks overlap and add extra volume.
    """

    def __init__(
        self,
        store: Any,
        org_ids: list[str],
        faults: set[str],
        interval_seconds: float = 60,
        org_active: Callable[[str], bool] | None = None,
    ) -> None:
        self.store = store
        self.org_ids = org_ids
        # A disabled org's users can no longer sign in, so it gets no traffic.
        self.org_active = org_active
        self.faults = faults
        self.interval_seconds = interval_seconds
        self.ticks = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread, which writes its first minute one interval from now."""
        if self._thread is not None:
            raise RuntimeError("the traffic generator is already running")
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, name="ue-sandbox-traffic", daemon=True
        )
        self._thread.start()
        logger.info("traffic generator started (every %g s)", self.interval_seconds)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and wait for it. Stopping a stopped generator is harmless."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
            logger.info("traffic generator stopped after %d ticks", self.ticks)

    def tick(self, now: datetime | None = None) -> int:
        """Write the minute of traffic that ends at `now` and return the row count."""
        if "no-telemetry" in self.faults:
            return 0
        end = _utc(now) if now is not None else datetime.now(UTC)
        org_ids = list(self.org_ids)
        if self.org_active is not None:
            org_ids = [org_id for org_id in org_ids if self.org_active(org_id)]
        rows = emit_minute(
            self.store,
            org_ids,
            set(self.faults),
            end - timedelta(minutes=1),
            readiness_failed="readiness-down" in self.faults,
        )
        self.ticks += 1
        return rows

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_seconds):
            try:
                self.tick()
            except Exception:
                # A failed tick must not end the thread, because the next may succeed.
                logger.exception("traffic generator tick %d failed", self.ticks + 1)
