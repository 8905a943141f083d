"""The isolation audit flow against the sandbox pilot, clean and with each fault."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from flows.isolation_audit import isolation_audit
from ue_pilot.sandbox.runner import SandboxProcess
from ue_pilot.sandbox.servers import find_free_port

# Each fault and the checks that must catch it. The audit must report the
# expected status on at least one of the listed checks, and never pass.
FAULT_CASES = [
    (
        "export-no-auth",
        "fail",
        ["access.export_requires_auth", "monitor.ue_export_unauthenticated"],
    ),
    ("export-ignores-org", "fail", ["access.export_rejects_other_org"]),
    ("cross-org-no-role-gate", "fail", ["access.cross_org_requires_role"]),
    ("rls-disabled", "fail", ["rls.enabled_forced", "rls.fail_open"]),
    ("rls-not-forced", "fail", ["rls.enabled_forced", "rls.app_role"]),
    ("rls-fail-open", "fail", ["rls.fail_open"]),
    ("rls-session-set", "fail", ["rls.pool_reuse"]),
    (
        "cross-org-events",
        "fail",
        ["telemetry.cross_org_events", "monitor.ue_rls_context_mismatch"],
    ),
    ("no-telemetry", "inconclusive", ["telemetry.liveness"]),
    ("readiness-down", "fail", ["health.ready", "monitor.ue_pilot_health_degraded"]),
    ("ready-requires-auth", "inconclusive", ["health.ready"]),
    ("slow-proxy", "fail", ["monitor.ue_django_proxy_latency_p99"]),
    (
        "auth-failure-storm",
        "fail",
        ["monitor.ue_auth_failure_rate", "telemetry.auth_failures"],
    ),
    ("logs-partial", "inconclusive", ["telemetry.liveness"]),
]


def statuses(result: dict, check_id: str) -> set[str]:
    return {c["status"] for c in result["checks"] if c["id"] == check_id}


@pytest.fixture(scope="module")
def clean_sandbox():
    with SandboxProcess(orgs=3) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def clean_result(prefect_server, clean_sandbox):
    """One audit of the clean sandbox, shared by the tests that read it."""
    patch = pytest.MonkeyPatch()
    for name, value in clean_sandbox.env.items():
        patch.setenv(name, value)
    try:
        yield isolation_audit()
    finally:
        patch.undo()


def test_clean_sandbox_passes(clean_result):
    """A sandbox without faults passes every check."""
    problems = [
        (c["id"], c["org"], c["summary"])
        for c in clean_result["checks"]
        if c["status"] != "pass"
    ]
    assert problems == []
    assert clean_result["verdict"] == "pass"


def test_clean_sandbox_covers_every_org(clean_result, clean_sandbox):
    """Per-org checks appear once for each pilot org."""
    orgs = clean_sandbox.env["UE_PILOT_ORG_IDS"].split(",")
    seen = {
        c["org"] for c in clean_result["checks"] if c["id"] == "rls.context_readback"
    }
    assert seen == set(orgs)


def test_result_has_no_secret(clean_result, clean_sandbox):
    """No probe token, routing key or Logs token appears in the result."""
    text = str(clean_result)
    env = clean_sandbox.env
    assert env["UE_PAGERDUTY_ROUTING_KEY"] not in text
    assert env["UE_LOGS_STATIC_TOKEN"] not in text
    for roles in json.loads(env["UE_PROBE_SESSIONS"]).values():
        for token in roles.values():
            assert token not in text


@pytest.mark.parametrize(
    "fault,expected,check_ids", FAULT_CASES, ids=[case[0] for case in FAULT_CASES]
)
def test_fault_is_caught(prefect_server, ue_env, fault, expected, check_ids):
    """Each sandbox fault turns the verdict and names a check that catches it."""
    with SandboxProcess(orgs=3, faults=[fault]) as sandbox:
        ue_env(sandbox.env)
        result = isolation_audit()
    caught = [
        check_id for check_id in check_ids if expected in statuses(result, check_id)
    ]
    assert result["verdict"] == expected
    assert caught, f"none of {check_ids} reported {expected}"


def test_failure_pages_critical(prefect_server, ue_env):
    """A failed isolation check triggers a critical PagerDuty event per org."""
    with SandboxProcess(orgs=2, faults=["cross-org-no-role-gate"]) as sandbox:
        ue_env(sandbox.env)
        isolation_audit()
        events_url = sandbox.env["UE_PAGERDUTY_EVENTS_URL"].replace(
            "/v2/enqueue", "/sandbox/events"
        )
        events = httpx.get(events_url).json()
    keys = {e["dedup_key"] for e in events if e["event_action"] == "trigger"}
    severities = {
        e["payload"]["severity"]
        for e in events
        if e["dedup_key"].endswith("access.cross_org_requires_role")
    }
    assert "ue-pilot/org_sandbox0001/access.cross_org_requires_role" in keys
    assert severities == {"critical"}


def test_workspace_schema_passes(prefect_server, ue_env, clean_sandbox):
    """The workspace tables (AppEvents, TimeGenerated) give the same verdict."""
    env = dict(clean_sandbox.env, UE_LOGS_SCHEMA="workspace", UE_LOGS_RESOURCE_ID="")
    ue_env(env)
    result = isolation_audit()
    problems = [c["id"] for c in result["checks"] if c["status"] != "pass"]
    assert problems == []


def test_window_overlaps_previous_run(prefect_server, ue_env, clean_sandbox):
    """A second run's window starts before the first run's window ended."""
    ue_env(dict(clean_sandbox.env, UE_STATE_PREFIX="window-test-" + uuid.uuid4().hex))
    first = isolation_audit()
    second = isolation_audit()
    first_end = datetime.fromisoformat(first["window"]["end"])
    second_start = datetime.fromisoformat(second["window"]["start"])
    assert second_start <= first_end - timedelta(minutes=15)


def test_next_pass_resolves_incident(prefect_server, ue_env, clean_sandbox):
    """An incident opened by a failing run is resolved by the next passing run."""
    env = dict(clean_sandbox.env, UE_STATE_PREFIX="resolve-test-" + uuid.uuid4().hex)
    # With "owner" as the minimum role, the admin probe session sits below the
    # minimum and is admitted, so the role gate check fails.
    ue_env(dict(env, UE_CROSS_ORG_MIN_ROLE="owner"))
    failing = isolation_audit()
    ue_env(env)
    passing = isolation_audit()
    key = "ue-pilot/org_sandbox0001/access.cross_org_requires_role"
    assert key in failing["paging"]["triggered"]
    assert key in passing["paging"]["resolved"]
    assert passing["paging"]["triggered"] == []


def test_unreachable_app_fails_clearly(prefect_server, ue_env, clean_sandbox):
    """An unreachable application fails health with the reason."""
    ue_env(dict(clean_sandbox.env, UE_BASE_URL=f"http://127.0.0.1:{find_free_port()}"))
    result = isolation_audit()
    ready = [c for c in result["checks"] if c["id"] == "health.ready"][0]
    assert ready["status"] == "fail"
    assert "ConnectError" in ready["observed"]["error"]
    assert statuses(result, "access.probe_sessions") == {"inconclusive"}
    assert result["verdict"] == "fail"


def test_unreachable_database_is_not_a_pass(prefect_server, ue_env, clean_sandbox):
    """With the database unreachable every RLS check is inconclusive or failed."""
    url = f"postgresql://nobody@127.0.0.1:{find_free_port()}/none"
    ue_env(dict(clean_sandbox.env, UE_DATABASE_URL=url))
    result = isolation_audit()
    rls = {c["status"] for c in result["checks"] if c["id"].startswith("rls.")}
    assert rls == {"inconclusive"}
    assert url not in str(result)


def test_evidence_artifacts(prefect_server, ue_env, clean_sandbox):
    """The run stores the ticked checklist and the checks table, without secrets."""
    ue_env(clean_sandbox.env)
    state = isolation_audit(return_state=True)
    artifacts = read_artifacts(state.state_details.flow_run_id)
    report = artifacts["isolation-audit-report"]
    table = artifacts["isolation-audit-checks"]
    tokens = [
        t
        for roles in json.loads(clean_sandbox.env["UE_PROBE_SESSIONS"]).values()
        for t in roles.values()
    ]
    assert "- [x] Export routes return 401 without auth" in report
    assert "- [ ] Monitoring alerts fire on test trigger" in report
    assert "rls.fail_open" in table
    assert not [t for t in tokens if t in report or t in table]


def test_result_persisted_as_json(prefect_server, ue_env, clean_sandbox):
    """The flow result is stored as JSON with the verdict, not as a pickle."""
    ue_env(clean_sandbox.env)
    state = isolation_audit(return_state=True)
    key = state.data.metadata.storage_key
    stored = json.loads(Path(key).read_text())
    not_passed = [
        (check["id"], check["status"], check["observed"])
        for check in stored["checks"]
        if check["status"] != "pass"
    ]
    assert stored["verdict"] == "pass", not_passed


def read_artifacts(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
    return {a.key: str(a.data) for a in artifacts}


def test_rejected_probe_sessions_not_pass(prefect_server, ue_env, clean_sandbox):
    """Probe sessions the server does not accept make the audit inconclusive."""
    orgs = clean_sandbox.env["UE_PILOT_ORG_IDS"].split(",")
    dead = {
        org: {role: "expired-token" for role in ("member", "admin", "owner")}
        for org in orgs
    }
    ue_env(dict(clean_sandbox.env, UE_PROBE_SESSIONS=json.dumps(dead)))
    result = isolation_audit()
    sessions = [c for c in result["checks"] if c["id"] == "access.probe_sessions"]
    assert {c["status"] for c in sessions} == {"inconclusive"}
    assert "org_sandbox0001 member" in sessions[0]["observed"]["rejected"]
    assert result["verdict"] == "inconclusive"


def test_definer_view_fails(prefect_server, ue_env):
    """A view over a tenant table without security_invoker fails its check."""
    with SandboxProcess(orgs=2) as sandbox:
        database = sandbox.env["UE_DATABASE_URL"].rsplit("/", 1)[1]
        admin = f"postgresql://postgres@127.0.0.1:5432/{database}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                "CREATE VIEW reward_totals AS "
                "SELECT org_id, sum(points) AS points FROM rewards "
                "GROUP BY org_id"
            )
        ue_env(sandbox.env)
        result = isolation_audit()
    statuses_seen = statuses(result, "rls.views_security_invoker")
    assert statuses_seen == {"fail"}


def test_health_failure_pages_error(prefect_server, ue_env):
    """A failed readiness check pages with severity error, not critical."""
    with SandboxProcess(orgs=2, faults=["readiness-down"]) as sandbox:
        ue_env(sandbox.env)
        isolation_audit()
        events_url = sandbox.env["UE_PAGERDUTY_EVENTS_URL"].replace(
            "/v2/enqueue", "/sandbox/events"
        )
        events = httpx.get(events_url).json()
    severities = {
        e["payload"]["severity"]
        for e in events
        if e["dedup_key"] == "ue-pilot/deployment/health.ready"
    }
    assert severities == {"error"}


def test_spoofed_probe_agent_still_counted(prefect_server, ue_env, clean_sandbox):
    """Failures sent with a probe-like User-Agent are not hidden from the rate."""
    base = clean_sandbox.env["UE_BASE_URL"]
    with httpx.Client(base_url=base) as client:
        for _ in range(300):
            client.get(
                "/api/v2/rewards/export",
                params={"orgId": "org_sandbox0001"},
                headers={
                    "Authorization": "Bearer not-a-session",
                    "User-Agent": "ue-pilot-audit/1 (attacker)",
                },
            )
    ue_env(dict(clean_sandbox.env, UE_STATE_PREFIX="spoof-test-" + uuid.uuid4().hex))
    result = isolation_audit()
    assert statuses(result, "monitor.ue_auth_failure_rate") == {"fail"}


def test_materialized_view_fails(prefect_server, ue_env):
    """A materialized view over a tenant table fails the view check."""
    with SandboxProcess(orgs=2) as sandbox:
        database = sandbox.env["UE_DATABASE_URL"].rsplit("/", 1)[1]
        admin = f"postgresql://postgres@127.0.0.1:5432/{database}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                "CREATE MATERIALIZED VIEW member_directory AS SELECT * FROM members"
            )
        ue_env(sandbox.env)
        result = isolation_audit()
    assert statuses(result, "rls.views_security_invoker") == {"fail"}


def test_secret_in_error_redacted(prefect_server, ue_env, clean_sandbox):
    """A password quoted by a library error never reaches the result."""
    url = "postgresql://ue_audit:brkDbPw996@[::1:5432/ue"
    ue_env(dict(clean_sandbox.env, UE_DATABASE_URL=url))
    result = isolation_audit()
    assert "brkDbPw996" not in json.dumps(result)
