"""The isolation audit flow against the sandbox pilot, clean and with each fault."""

from __future__ import annotations

import httpx
import pytest

from flows.isolation_audit import isolation_audit
from ue_pilot.sandbox.runner import SandboxProcess

# Each fault and the checks that must catch it. The audit must report the
# expected status on at least one of the listed checks, and never pass.
FAULT_CASES = [
    ("export-no-auth", "fail", ["access.export_requires_auth",
                                "monitor.ue_export_unauthenticated"]),
    ("export-ignores-org", "fail", ["access.export_rejects_other_org"]),
    ("cross-org-no-role-gate", "fail", ["access.cross_org_requires_role"]),
    ("rls-disabled", "fail", ["rls.enabled_forced", "rls.fail_open"]),
    ("rls-not-forced", "fail", ["rls.enabled_forced", "rls.app_role"]),
    ("rls-fail-open", "fail", ["rls.fail_open"]),
    ("rls-session-set", "fail", ["rls.pool_reuse"]),
    ("cross-org-events", "fail", ["telemetry.cross_org_events",
                                  "monitor.ue_rls_context_mismatch"]),
    ("no-telemetry", "inconclusive", ["telemetry.liveness"]),
    ("readiness-down", "fail", ["health.ready", "monitor.ue_pilot_health_degraded"]),
    ("ready-requires-auth", "inconclusive", ["health.ready"]),
    ("slow-proxy", "fail", ["monitor.ue_django_proxy_latency_p99"]),
    ("auth-failure-storm", "fail", ["monitor.ue_auth_failure_rate",
                                    "telemetry.auth_failures"]),
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
    problems = [(c["id"], c["org"], c["summary"]) for c in clean_result["checks"]
                if c["status"] != "pass"]
    assert problems == []
    assert clean_result["verdict"] == "pass"


def test_clean_sandbox_covers_every_org(clean_result, clean_sandbox):
    """Per-org checks appear once for each pilot org."""
    orgs = clean_sandbox.env["UE_PILOT_ORG_IDS"].split(",")
    seen = {c["org"] for c in clean_result["checks"]
            if c["id"] == "rls.context_readback"}
    assert seen == set(orgs)


def test_result_has_no_secret(clean_result, clean_sandbox):
    """No probe token, routing key or Logs token appears in the result."""
    text = str(clean_result)
    env = clean_sandbox.env
    assert env["UE_PAGERDUTY_ROUTING_KEY"] not in text
    assert env["UE_LOGS_STATIC_TOKEN"] not in text
    for roles in __import__("json").loads(env["UE_PROBE_SESSIONS"]).values():
        for token in roles.values():
            assert token not in text


@pytest.mark.parametrize("fault,expected,check_ids", FAULT_CASES,
                         ids=[case[0] for case in FAULT_CASES])
def test_fault_is_caught(prefect_server, ue_env, fault, expected, check_ids):
    """Each sandbox fault turns the verdict and names a check that catches it."""
    with SandboxProcess(orgs=3, faults=[fault]) as sandbox:
        ue_env(sandbox.env)
        result = isolation_audit()
    caught = [check_id for check_id in check_ids
              if expected in statuses(result, check_id)]
    assert result["verdict"] == expected
    assert caught, f"none of {check_ids} reported {expected}"


def test_failure_pages_critical(prefect_server, ue_env):
    """A failed isolation check triggers a critical PagerDuty event per org."""
    with SandboxProcess(orgs=2, faults=["cross-org-no-role-gate"]) as sandbox:
        ue_env(sandbox.env)
        isolation_audit()
        events_url = sandbox.env["UE_PAGERDUTY_EVENTS_URL"].replace(
            "/v2/enqueue", "/sandbox/events")
        events = httpx.get(events_url).json()
    keys = {e["dedup_key"] for e in events if e["event_action"] == "trigger"}
    severities = {e["payload"]["severity"] for e in events
                  if e["dedup_key"].endswith("access.cross_org_requires_role")}
    assert "ue-pilot/org_sandbox0001/access.cross_org_requires_role" in keys
    assert severities == {"critical"}
