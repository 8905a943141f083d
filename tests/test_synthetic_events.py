"""The hourly audit leaves out onboarding's synthetic cross-org events, and only
those whose route the tool registered in Redis. A forged label is not enough."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
import redis
from prefect.logging import disable_run_logger

from flows.isolation_audit import isolation_audit
from tasks.logs import QueryOutcome, evaluate_cross_org
from tasks.telemetry_ingest import (
    build_synthetic_event,
    parse_connection_string,
    plant_synthetic_event,
    register_synthetic_route,
    send_track,
    synthetic_route,
    synthetic_routes_key,
)
from ue_pilot.checks import Status
from ue_pilot.sandbox.runner import SandboxProcess
from ue_pilot.settings import Settings

CHECK = "telemetry.cross_org_events"
ORGS = ["org_sandbox0001", "org_sandbox0002"]


def cross_org_row(route: str, request_org: str, attempts: int = 1) -> dict:
    return {
        "orgId": "ue-pilot-synthetic",
        "requestOrgId": request_org,
        "route": route,
        "attempts": attempts,
        "first_seen": "2026-03-01T10:00:00Z",
        "last_seen": "2026-03-01T10:00:00Z",
    }


def check_of(checks: list, org: str):
    return next(check for check in checks if check.org == org)


# Evaluation, without services


def test_evaluate_leaves_out_registered_route():
    """A row whose route is registered is left out and counted for its org."""
    route = synthetic_route(str(uuid.uuid4()))
    outcome = QueryOutcome([cross_org_row(route, ORGS[0], attempts=2)])

    checks = evaluate_cross_org(ORGS, outcome, frozenset({route}))

    assert check_of(checks, ORGS[0]).status == Status.PASS
    assert check_of(checks, ORGS[0]).observed["synthetic_left_out"] == 2
    assert check_of(checks, ORGS[1]).observed["synthetic_left_out"] == 0


def test_evaluate_counts_unregistered_route():
    """A labelled row with an unregistered route fails its org's check."""
    registered = synthetic_route(str(uuid.uuid4()))
    forged = synthetic_route(str(uuid.uuid4()))
    outcome = QueryOutcome([cross_org_row(forged, ORGS[0])])

    checks = evaluate_cross_org(ORGS, outcome, frozenset({registered}))

    assert check_of(checks, ORGS[0]).status == Status.FAIL
    assert check_of(checks, ORGS[0]).observed["synthetic_left_out"] == 0


def test_evaluate_synthetic_outside_pilot_orgs():
    """A registered row of an org not yet in the pilot fails no check."""
    route = synthetic_route(str(uuid.uuid4()))
    outcome = QueryOutcome([cross_org_row(route, "org_onboarded9")])

    checks = evaluate_cross_org(ORGS, outcome, frozenset({route}))

    assert [check.status for check in checks] == [Status.PASS, Status.PASS]


def test_evaluate_without_routes_records_no_count():
    """Without a set of routes nothing is left out and no count is recorded."""
    route = synthetic_route(str(uuid.uuid4()))
    outcome = QueryOutcome([cross_org_row(route, ORGS[0])])

    checks = evaluate_cross_org(ORGS, outcome)

    assert check_of(checks, ORGS[0]).status == Status.FAIL
    assert "synthetic_left_out" not in check_of(checks, ORGS[0]).observed


# The audit against the sandbox


@pytest.fixture(scope="module")
def sandbox():
    with SandboxProcess(orgs=2) as running:
        yield running


@pytest.fixture
def env(ue_env, sandbox):
    ue_env(sandbox.env)
    return sandbox.env


def audit_check(result: dict, org: str) -> dict:
    return next(c for c in result["checks"] if c["id"] == CHECK and c["org"] == org)


def plant(org: str) -> str:
    """Plant a synthetic event for `org` with onboarding's task and return its route."""
    run_id = str(uuid.uuid4())
    with disable_run_logger():
        planted = plant_synthetic_event.fn(Settings(), org, run_id)
    assert planted.status == Status.PASS, planted.summary
    return synthetic_route(run_id)


def forge(org: str) -> str:
    """Send a labelled synthetic event with an unregistered route and return it."""
    settings = Settings()
    target = parse_connection_string(
        settings.appinsights_connection_string.get_secret_value()
    )
    run_id = str(uuid.uuid4())
    event = build_synthetic_event(
        target.instrumentation_key, org, run_id, datetime.now(UTC)
    )
    status, body = send_track(target.track_url, event)
    assert (status, body.get("itemsAccepted")) == (200, 1)
    return synthetic_route(run_id)


def test_audit_leaves_out_planted_event(prefect_server, env):
    """An event planted by onboarding passes the audit and is counted as left out."""
    plant(ORGS[0])

    result = isolation_audit()
    check = audit_check(result, ORGS[0])

    assert check["status"] == "pass", check["summary"]
    assert check["observed"]["synthetic_left_out"] == 1


def test_audit_fails_forged_event(prefect_server, env):
    """A forged event fails the audit while a registered one beside it is left out."""
    plant(ORGS[1])
    forged = forge(ORGS[1])

    result = isolation_audit()
    check = audit_check(result, ORGS[1])

    assert check["status"] == "fail"
    assert [a["route"] for a in check["observed"]["attempts"]] == [forged]
    assert check["observed"]["synthetic_left_out"] == 1


def test_sandbox_stop_forgets_synthetic_routes(ue_env):
    """Stopping a sandbox deletes the Redis key of its synthetic routes."""
    with SandboxProcess(orgs=1) as running:
        ue_env(running.env)
        register_synthetic_route(Settings(), synthetic_route(str(uuid.uuid4())))
        key = synthetic_routes_key(running.env["UE_BASE_URL"])
        store = redis.Redis.from_url(running.env["UE_REDIS_URL"])
        assert store.exists(key) == 1

    assert store.exists(key) == 0
