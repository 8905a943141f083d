"""The onboarding flow against the sandbox pilot: a full run, a re-run, each
injected failure and its compensation, the evidence records, an org that a
rollback disabled, and input rejected before any request."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from azure.storage.blob import BlobServiceClient
from click.testing import CliRunner
from prefect import flow
from psycopg.conninfo import make_conninfo

from flows.onboarding import OnboardingRequestError, onboarding, validate_request
from flows.rollback import disable_org
from tasks.identity import get_organization, open_clerk
from tasks.telemetry_ingest import (
    ConnectionStringError,
    parse_connection_string,
    synthetic_routes_key,
)
from ue_pilot.cli import main
from ue_pilot.orgids import validate_org_id
from ue_pilot.sandbox.onboarding import CROSS_ORG_SEED, SEEDS_DIR
from ue_pilot.sandbox.runner import DEFAULT_ADMIN_URL, SandboxProcess
from ue_pilot.settings import Settings

SEED_NAMES = sorted(path.name for path in SEEDS_DIR.glob("*.sql"))
# Each sandbox fault, the step it breaks, and the check of that step that fails.
FAULT_CASES = [
    ("rls-disabled", 2, "rls.enabled_forced"),
    ("export-ignores-org", 4, "access.export_rejects_other_org"),
    ("export-no-auth", 5, "access.export_requires_auth"),
    ("cross-org-no-role-gate", 6, "access.cross_org_requires_role"),
    ("telemetry-ingest-drops", 7, "onboarding.detection"),
]


@pytest.fixture(scope="module")
def sandbox():
    with SandboxProcess(orgs=3, storage=True) as running:
        yield running
        forget_synthetic_routes(running.env)


@pytest.fixture
def env(ue_env, sandbox, monkeypatch):
    ue_env(sandbox.env)
    # The sandbox's Logs stand-in returns an ingested event at once.
    monkeypatch.setenv("UE_ONBOARDING_DETECTION_TIMEOUT_SECONDS", "5")
    return sandbox.env


def forget_synthetic_routes(env: dict[str, str]) -> None:
    """Delete the Redis key of the synthetic routes the tests planted."""
    client = redis.Redis.from_url(env["UE_REDIS_URL"])
    client.delete(synthetic_routes_key(env["UE_BASE_URL"]))


def run_flow(env: dict[str, str], slug: str, seed_dir: str | Path | None = None,
             name: str | None = None) -> tuple[object, dict]:
    """Run the onboarding flow and return its final state and its result."""
    state = onboarding(
        name=name or f"Union {slug}",
        slug=slug,
        created_by=env["UE_ONBOARDING_CREATED_BY"],
        seed_dir=str(seed_dir or env["UE_SEED_SCRIPTS_DIR"]),
        return_state=True,
    )
    return state, state.result(raise_on_failure=False)


def step(result: dict, number: int) -> dict:
    return next(s for s in result["steps"] if s["number"] == number)


def check(result: dict, number: int, check_id: str) -> dict:
    return next(c for c in step(result, number)["checks"] if c["id"] == check_id)


def org_metadata(org_id: str) -> dict:
    """Read the org's public metadata through the Clerk SDK."""
    organization = open_clerk(Settings()).organizations.get(organization_id=org_id)
    return dict(organization.public_metadata or {})


def clerk_stats(env: dict[str, str]) -> dict:
    return httpx.get(env["UE_SANDBOX_CLERK_URL"] + "/sandbox/stats").json()


def seed_log(env: dict[str, str], org_id: str) -> list[tuple]:
    with psycopg.connect(env["UE_SEED_DATABASE_URL"]) as conn:
        return conn.execute(
            "SELECT script, sha256, applied_at FROM ue_pilot.seed_log"
            " WHERE org_id = %s ORDER BY script",
            (org_id,),
        ).fetchall()


def evidence_record(env: dict[str, str], result: dict) -> dict:
    """Download the evidence record that the run's result names."""
    org_id = result["org"]["org"]
    name = result["evidence"]["records"][org_id]["record"]
    service = BlobServiceClient.from_connection_string(
        env["UE_SANDBOX_BLOB_CONNECTION_STRING"]
    )
    data = service.get_container_client("evidence").download_blob(name).readall()
    return json.loads(data)


def admin_url(env: dict[str, str]) -> str:
    database = env["UE_SEED_DATABASE_URL"].rsplit("/", 1)[1]
    return make_conninfo(DEFAULT_ADMIN_URL, dbname=database)


def run_artifacts(state) -> dict[str, object]:
    """Return the run's artifacts by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])
            )
        )
    return {artifact.key: artifact for artifact in artifacts}


@pytest.fixture(scope="module")
def onboarded(prefect_server, sandbox):
    """One full onboarding of a new org, shared by the tests that read it."""
    patch = pytest.MonkeyPatch()
    for name, value in sandbox.env.items():
        patch.setenv(name, value)
    try:
        yield run_flow(sandbox.env, "union-local-100")
    finally:
        patch.undo()


def test_onboarding_completes_every_step(onboarded):
    """A new org passes all seven steps and the final activation."""
    state, result = onboarded
    problems = [(s["number"], c["id"], c["summary"]) for s in result["steps"]
                for c in s["checks"] if c["status"] != "pass"]
    assert state.is_completed()
    assert problems == []
    assert result["outcome"] == "onboarded"
    assert [s["status"] for s in result["steps"]] == ["pass"] * 8


def test_onboarding_creates_active_org(onboarded, env):
    """The org exists in Clerk with a Clerk-generated id and pilot status active."""
    _, result = onboarded
    org_id = result["org"]["org"]
    metadata = org_metadata(org_id)
    assert result["org"]["outcome"] == "created"
    assert validate_org_id(org_id) == org_id
    assert metadata["ue_pilot_status"] == "active"
    assert metadata["ue_pilot_status_details"]["run_id"] == result["flow_run_id"]


def test_onboarding_records_seed_scripts(onboarded, env):
    """Every seed script is applied once and recorded with its sha256."""
    _, result = onboarded
    logged = seed_log(env, result["org"]["org"])
    seeds = check(result, 3, "onboarding.seed_scripts")
    assert [row[0] for row in logged] == SEED_NAMES
    assert seeds["observed"]["applied"] == SEED_NAMES
    assert all(len(row[1]) == 64 for row in logged)


def test_onboarding_proves_monitoring(onboarded, env):
    """The synthetic event is detected, and PagerDuty got the page and its resolve."""
    _, result = onboarded
    org_id = result["org"]["org"]
    detection = check(result, 7, "onboarding.detection")
    incidents = httpx.get(
        env["UE_PAGERDUTY_EVENTS_URL"].replace("/v2/enqueue", "/sandbox/incidents")
    ).json()
    incident = incidents[f"ue-pilot/{org_id}/onboarding.test_page"]
    assert detection["observed"]["attempts"][0]["requestOrgId"] == org_id
    assert detection["observed"]["attempts"][0]["orgId"] == "ue-pilot-synthetic"
    assert incident["status"] == "resolved"
    assert "test page" in incident["summary"]


def test_onboarding_publishes_checklist(onboarded):
    """The run has the checklist and checks table artifacts, every step ticked."""
    state, result = onboarded
    artifacts = run_artifacts(state)
    checklist = artifacts["onboarding-checklist"].data
    rows = artifacts["onboarding-checks"].data
    assert "# Onboarding: ONBOARDED" in checklist
    for number in range(1, 9):
        assert f"- [x] {number}. " in checklist
    assert len(json.loads(rows) if isinstance(rows, str) else rows) == sum(
        len(s["checks"]) for s in result["steps"])


def test_onboarding_result_has_no_secret(onboarded, env):
    """No token, key or connection string is in the result or the artifacts."""
    state, result = onboarded
    text = json.dumps(result) + "".join(
        str(artifact.data) for artifact in run_artifacts(state).values()
    )
    secrets = [env[name] for name in (
        "UE_PAGERDUTY_ROUTING_KEY", "UE_LOGS_STATIC_TOKEN", "UE_CLERK_SECRET_KEY",
        "UE_APPINSIGHTS_CONNECTION_STRING",
    )]
    secrets.append(parse_connection_string(
        env["UE_APPINSIGHTS_CONNECTION_STRING"]).instrumentation_key)
    secrets += [token for roles in json.loads(env["UE_PROBE_SESSIONS"]).values()
                for token in roles.values()]
    assert [secret for secret in secrets if secret in text] == []


def test_onboarding_writes_evidence_record(onboarded, env):
    """The org's record contains every check of every step and the run's outcome."""
    _, result = onboarded
    record = evidence_record(env, result)
    check_ids = [c["id"] for s in result["steps"] for c in s["checks"]]
    assert record["family"] == "onboarding"
    assert record["org"] == result["org"]["org"]
    assert record["run"]["flow_run_id"] == result["flow_run_id"]
    assert record["verdict"] == "pass"
    assert [c["id"] for c in record["checks"]] == check_ids
    assert record["target"]["outcome"] == "onboarded"
    assert record["target"]["slug"] == "union-local-100"


def test_onboarding_rerun_changes_nothing(onboarded, env):
    """A re-run adopts the org, skips every seed script and writes nothing to Clerk."""
    _, first = onboarded
    org_id = first["org"]["org"]
    clerk = open_clerk(Settings())
    before = clerk.organizations.get(organization_id=org_id)
    logged = seed_log(env, org_id)
    count = clerk.organizations.list(limit=1).total_count

    state, result = run_flow(env, "union-local-100")

    after = clerk.organizations.get(organization_id=org_id)
    seeds = check(result, 3, "onboarding.seed_scripts")
    assert state.is_completed()
    assert result["org"]["org"] == org_id
    assert result["org"]["outcome"] == "adopted"
    assert seeds["observed"]["applied"] == []
    assert seeds["observed"]["skipped"] == SEED_NAMES
    assert seed_log(env, org_id) == logged
    assert after.updated_at == before.updated_at
    assert after.public_metadata == before.public_metadata
    assert clerk.organizations.list(limit=1).total_count == count


def test_onboarding_taken_slug_fails_cleanly(prefect_server, env):
    """A slug of another creator fails step 1, creates and disables nothing."""
    before = clerk_stats(env)["by_route"]
    metadata = org_metadata("org_sandbox0001")

    state, result = run_flow(env, "org-sandbox0001")

    after = clerk_stats(env)["by_route"]
    failure = check(result, 1, "onboarding.clerk_org")
    assert state.is_failed()
    assert result["failure"]["step"] == 1
    assert "is taken by org org_sandbox0001" in failure["summary"]
    assert result["compensation"] is None
    assert result["org"] is None
    assert after.get("POST /v1/organizations") == before.get("POST /v1/organizations")
    assert org_metadata("org_sandbox0001") == metadata
    assert [s["status"] for s in result["steps"][1:]] == ["not run"] * 7


@pytest.fixture(scope="module")
def cross_org_seeds(tmp_path_factory) -> Path:
    """The sandbox's seed scripts plus one that writes a row of org_sandbox0001."""
    folder = tmp_path_factory.mktemp("seeds-cross-org")
    for path in SEEDS_DIR.glob("*.sql"):
        shutil.copy(path, folder)
    shutil.copy(CROSS_ORG_SEED, folder)
    return folder


@pytest.fixture(scope="module")
def rejected_seed(prefect_server, sandbox, cross_org_seeds):
    """An onboarding whose last seed script writes another org's row."""
    patch = pytest.MonkeyPatch()
    for name, value in sandbox.env.items():
        patch.setenv(name, value)
    try:
        yield run_flow(sandbox.env, "union-local-300", cross_org_seeds)
    finally:
        patch.undo()


def test_cross_org_seed_is_rejected(rejected_seed, env):
    """Row-level security rejects the script; the good scripts stay applied once."""
    state, result = rejected_seed
    seeds = check(result, 3, "onboarding.seed_scripts")
    with psycopg.connect(admin_url(env)) as conn:
        leaked = conn.execute(
            "SELECT count(*) FROM members WHERE id = 'org_sandbox0001:m99'"
        ).fetchone()[0]
    assert state.is_failed()
    assert seeds["status"] == "fail"
    assert seeds["observed"]["failed"] == CROSS_ORG_SEED.name
    assert "row-level security" in seeds["summary"]
    assert leaked == 0
    assert [row[0] for row in seed_log(env, result["org"]["org"])] == SEED_NAMES


def test_cross_org_seed_disables_org(rejected_seed):
    """The compensation disables the org and records step 3 and the error."""
    _, result = rejected_seed
    metadata = org_metadata(result["org"]["org"])
    details = metadata["ue_pilot_status_details"]
    assert metadata["ue_pilot_status"] == "disabled"
    assert details["step"] == 3
    assert details["run_id"] == result["flow_run_id"]
    assert "row-level security" in details["error"]
    assert result["compensation"]["status"] == "pass"


def test_failed_onboarding_writes_evidence_record(rejected_seed, env):
    """A failed run's record contains the failed check, the compensation and step."""
    _, result = rejected_seed
    record = evidence_record(env, result)
    statuses = {c["id"]: c["status"] for c in record["checks"]}
    assert record["verdict"] == "fail"
    assert statuses["onboarding.seed_scripts"] == "fail"
    assert statuses["onboarding.compensation"] == "pass"
    assert record["target"]["outcome"] == "failed"
    assert record["target"]["failure"]["step"] == 3


def test_rerun_after_fix_reopens_org(rejected_seed, env):
    """A re-run without the bad script reopens the org and leaves it active."""
    _, failed_run = rejected_seed
    state, result = run_flow(env, "union-local-300")
    seeds = check(result, 3, "onboarding.seed_scripts")
    assert state.is_completed()
    assert result["org"]["org"] == failed_run["org"]["org"]
    assert result["org"]["outcome"] == "reopened"
    assert seeds["observed"]["skipped"] == SEED_NAMES
    assert org_metadata(result["org"]["org"])["ue_pilot_status"] == "active"


@flow(name="rollback-disable-step")
def disable_step(org_id: str) -> dict:
    """Run the rollback's disable step alone, inside a flow run as a rollback does."""
    details = {"rollback_id": "rollback-test-700", "run_id": "run-test-700"}
    return disable_org(Settings(), org_id, details)


@pytest.fixture(scope="module")
def rolled_back_org(prefect_server, sandbox, cross_org_seeds):
    """An org that a failed onboarding disabled, then a rollback's disable step.

    A rollback cannot export an org whose sessions UE already rejects, so this
    runs the rollback's disable step alone, as it runs after a rollback's
    earlier steps.
    """
    patch = pytest.MonkeyPatch()
    for name, value in sandbox.env.items():
        patch.setenv(name, value)
    try:
        _, failed_run = run_flow(sandbox.env, "union-local-700", cross_org_seeds)
        org_id = failed_run["org"]["org"]
        disabled = disable_step(org_id)
        yield {"org": org_id, "failed_run": failed_run, "disabled": disabled}
    finally:
        patch.undo()


def test_rollback_disable_replaces_onboarding_details(rolled_back_org, env):
    """The rollback's disable replaces the failed onboarding's status details."""
    metadata = org_metadata(rolled_back_org["org"])
    details = metadata["ue_pilot_status_details"]
    assert rolled_back_org["disabled"]["already_disabled"] is False
    assert metadata["ue_pilot_status"] == "disabled"
    assert details["flow"] == "rollback"
    assert details["rollback_id"] == "rollback-test-700"
    assert "step" not in details
    assert "error" not in details
    assert details["replaced"]["flow"] == "onboarding"
    assert details["replaced"]["run_id"] == rolled_back_org["failed_run"]["flow_run_id"]


def test_onboarding_never_reopens_rolled_back_org(rolled_back_org, env):
    """A re-run for a rolled-back org fails step 1 and leaves the org disabled."""
    before = org_metadata(rolled_back_org["org"])
    state, result = run_flow(env, "union-local-700")
    failure = check(result, 1, "onboarding.clerk_org")
    assert state.is_failed()
    assert result["failure"]["step"] == 1
    assert "was rolled back (rollback rollback-test-700" in failure["summary"]
    assert result["org"] is None
    assert result["compensation"] is None
    assert org_metadata(rolled_back_org["org"]) == before


def test_changed_seed_script_fails(prefect_server, env, tmp_path):
    """A script whose content changed after it was applied fails step 3."""
    shutil.copytree(SEEDS_DIR, tmp_path / "seeds")
    state, first = run_flow(env, "union-local-400", tmp_path / "seeds")
    script = tmp_path / "seeds" / SEED_NAMES[1]
    script.write_text(script.read_text() + "\n-- changed after it was applied\n")

    state, result = run_flow(env, "union-local-400", tmp_path / "seeds")

    seeds = check(result, 3, "onboarding.seed_scripts")
    assert first["outcome"] == "onboarded"
    assert state.is_failed()
    assert seeds["observed"]["failed"] == SEED_NAMES[1]
    assert "changed since it was applied" in seeds["summary"]
    assert org_metadata(result["org"]["org"])["ue_pilot_status"] == "disabled"


def test_rejected_test_page_compensates(prefect_server, env, monkeypatch):
    """PagerDuty rejecting the test page fails step 7 and disables the org."""
    monkeypatch.setenv("UE_PAGERDUTY_ROUTING_KEY", "0" * 32)
    state, result = run_flow(env, "union-local-500")
    page = check(result, 7, "onboarding.test_page_sent")
    metadata = org_metadata(result["org"]["org"])
    assert state.is_failed()
    assert page["status"] == "fail"
    assert "rejected: HTTP 400" in json.dumps(page["observed"])
    assert metadata["ue_pilot_status"] == "disabled"
    assert metadata["ue_pilot_status_details"]["step"] == 7


@pytest.mark.parametrize(
    "fault,failed_step,check_id", FAULT_CASES, ids=[case[0] for case in FAULT_CASES]
)
def test_fault_at_step_compensates(prefect_server, ue_env, monkeypatch, fault,
                                   failed_step, check_id):
    """A fault breaking one step fails it, skips the rest, and disables the org."""
    with SandboxProcess(orgs=2, faults=[fault]) as faulty:
        ue_env(faulty.env)
        monkeypatch.setenv("UE_ONBOARDING_DETECTION_TIMEOUT_SECONDS", "3")
        try:
            state, result = run_flow(faulty.env, "union-local-600")
            metadata = org_metadata(result["org"]["org"])
            artifacts = run_artifacts(state)
        finally:
            forget_synthetic_routes(faulty.env)

    statuses = [s["status"] for s in result["steps"]]
    details = metadata["ue_pilot_status_details"]
    assert state.is_failed()
    assert check(result, failed_step, check_id)["status"] == "fail"
    assert statuses[: failed_step - 1] == ["pass"] * (failed_step - 1)
    assert statuses[failed_step:] == ["not run"] * (8 - failed_step)
    assert metadata["ue_pilot_status"] == "disabled"
    assert details["step"] == failed_step
    assert details["run_id"] == result["flow_run_id"]
    assert result["compensation"]["status"] == "pass"
    assert "## Compensation" in artifacts["onboarding-checklist"].data


BAD_REQUESTS = [
    ("slug", "", "it is empty"),
    ("slug", "Union-Local", "lowercase letters"),
    ("slug", "union_local", "lowercase letters"),
    ("slug", "-union", "lowercase letters"),
    ("slug", "union--local", "lowercase letters"),
    ("slug", "../org", "lowercase letters"),
    ("slug", "*", "lowercase letters"),
    ("slug", "u" * 65, "the maximum is 64"),
    ("name", "", "it is empty"),
    ("name", " padded", "leading or trailing spaces"),
    ("name", "n" * 257, "the maximum is 256"),
    ("created_by", "org_sandbox0001", "expected a Clerk user id"),
    ("created_by", "", "expected a Clerk user id"),
]


@pytest.mark.parametrize("field,value,message", BAD_REQUESTS,
                         ids=[f"{f}-{v[:12]!r}" for f, v, _ in BAD_REQUESTS])
def test_validate_request_rejects_bad_input(field, value, message):
    """A bad slug, name or creator is rejected with the value and the fix."""
    request = {"name": "Union Local 1", "slug": "union-local-1",
               "created_by": "user_2abc123", "seed_dir": str(SEEDS_DIR)}
    request[field] = value
    with pytest.raises(OnboardingRequestError, match=message):
        validate_request(**request)


def test_validate_request_rejects_bad_seed_folder(tmp_path):
    """A missing, empty or mixed seed folder is rejected before any request."""
    request = {"name": "Union Local 1", "slug": "union-local-1",
               "created_by": "user_2abc123"}
    (tmp_path / "empty").mkdir()
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "010_a.sql").write_text("SELECT 1;")
    (tmp_path / "mixed" / "README.md").write_text("notes")
    with pytest.raises(OnboardingRequestError, match="not found"):
        validate_request(**request, seed_dir=str(tmp_path / "missing"))
    with pytest.raises(OnboardingRequestError, match="no \\*.sql script"):
        validate_request(**request, seed_dir=str(tmp_path / "empty"))
    with pytest.raises(OnboardingRequestError, match="README.md"):
        validate_request(**request, seed_dir=str(tmp_path / "mixed"))


def test_invalid_slug_sends_no_request(prefect_server, env):
    """The flow rejects an invalid slug before it sends Clerk any request."""
    before = clerk_stats(env)["requests"]
    state, error = run_flow(env, "Not A Slug")
    assert state.is_failed()
    assert isinstance(error, OnboardingRequestError)
    assert clerk_stats(env)["requests"] == before


def test_cli_invalid_slug_is_usage_error():
    """`ue-pilot onboard` exits 2 on an invalid slug, naming it and the fix."""
    result = CliRunner().invoke(
        main, ["onboard", "--name", "Union", "--slug", "Union_Local"]
    )
    assert result.exit_code == 2
    assert "invalid slug 'Union_Local'" in result.output


def test_ingestion_endpoint_must_use_https():
    """A connection string with a plain-http endpoint off loopback is rejected."""
    key = "00000000-0000-0000-0000-000000000000"
    target = parse_connection_string(f"InstrumentationKey={key}")
    assert target.track_url == "https://dc.services.visualstudio.com/v2.1/track"
    with pytest.raises(ConnectionStringError, match="use https"):
        parse_connection_string(
            f"InstrumentationKey={key};IngestionEndpoint=http://example.com/"
        )
    with pytest.raises(ConnectionStringError, match="no InstrumentationKey"):
        parse_connection_string("IngestionEndpoint=https://example.com/")


def test_ingestion_standin_rejects_wrong_key(sandbox):
    """The sandbox's track endpoint returns 206 and names the item with a bad key."""
    target = parse_connection_string(sandbox.env["UE_APPINSIGHTS_CONNECTION_STRING"])
    good = {"iKey": target.instrumentation_key, "time": "2026-01-01T00:00:00Z",
            "data": {"baseType": "EventData", "baseData": {"ver": 2, "name": "x"}}}
    bad = dict(good, iKey="11111111-1111-1111-1111-111111111111")
    response = httpx.post(target.track_url, json=[good, bad])
    assert response.status_code == 206
    assert response.json()["itemsAccepted"] == 1
    assert response.json()["errors"][0]["index"] == 1



def test_interrupted_onboarding_writes_record(prefect_server, env, monkeypatch):
    """A Ctrl-C during step 4 disables the org and still leaves its evidence record.

    KeyboardInterrupt is used for both interrupts: a TerminationSignal raised
    in process makes Prefect send SIGTERM to the test process itself.
    """
    import flows.onboarding as onboarding_module

    def interrupted(settings, org_id):
        raise KeyboardInterrupt

    monkeypatch.setattr(onboarding_module, "obtain_probe_sessions", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_flow(env, "union-local-650")

    organization = get_organization(open_clerk(Settings()), "union-local-650")
    metadata = dict(organization.public_metadata or {})
    service = BlobServiceClient.from_connection_string(
        env["UE_SANDBOX_BLOB_CONNECTION_STRING"]
    )
    evidence = service.get_container_client("evidence")
    names = [name for name in evidence.list_blob_names(
        name_starts_with=f"{organization.id}/onboarding/")
        if name.endswith("/record.json")]
    assert metadata["ue_pilot_status"] == "disabled"
    assert metadata["ue_pilot_status_details"]["step"] == 4
    assert len(names) == 1, names
    record = json.loads(evidence.download_blob(names[0]).readall())
    assert record["target"]["outcome"] == "failed"
    assert record["target"]["failure"]["error"].startswith("KeyboardInterrupt")
