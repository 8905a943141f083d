"""The rollback flow against the sandbox: Clerk stand-in, Azurite, telemetry and
the notification webhook, each run resumed with its approval through the Prefect
API, and the evidence record each approved run writes."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient
from click.testing import CliRunner
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogWorker
from prefect.states import State

from flows.rollback import (
    PLAN_ARTIFACT,
    ApprovalRejectedError,
    RollbackRequestError,
    SessionsRemainError,
    UnknownOrgError,
    VerificationInconclusiveError,
    is_evidence_blob,
    render_plan,
    rollback,
)
from tasks.archive import ArchiveCopyError
from ue_pilot.approvals import PauseResponder, create_flow_run, execute_flow_run
from ue_pilot.cli import main
from ue_pilot.evidence_verify import verify_chain
from ue_pilot.orgids import InvalidOrgIdError
from ue_pilot.sandbox.runner import SandboxProcess

ORG_DONE = "org_sandbox0001"  # rolled back once, then asked again
ORG_UNTOUCHED = "org_sandbox0002"  # every rejected or dry run; never changed
ORG_RESUMED = "org_sandbox0003"  # fails at the verify step, then a second run
ORG_CLI = "org_sandbox0004"  # rolled back through the command line
ORG_ACTIVE = "org_sandbox0005"  # keeps signing in, so telemetry passes each disable
REQUESTER = "Rita Requester"
APPROVER = "Alex Approver"
REASON = "pilot ended by the union"
# The checks of a rollback's evidence record, in order.
RECORD_CHECKS = [
    "rollback.approval", "rollback.notify", "rollback.export", "rollback.disable",
    "rollback.sessions", "rollback.archive", "rollback.status_document",
]
# Settings every rollback test uses: a quick telemetry poll and approval timeout.
FAST = {
    "UE_ROLLBACK_TELEMETRY_POLL_SECONDS": "1",
    "UE_ROLLBACK_TELEMETRY_WAIT_SECONDS": "90",
    "UE_ROLLBACK_APPROVAL_TIMEOUT_SECONDS": "120",
}


# Helpers


def approval_input(
    org: str, approver: str = APPROVER, comment: str = "checked the plan"
) -> dict:
    return {"org_id": org, "approver": approver, "comment": comment}


def run_rollback(org: str, approval: dict | None = None, **parameters):
    """Run the flow in this thread, resuming its pause with `approval` if given."""
    request = {"org_id": org, "reason": REASON, "requested_by": REQUESTER,
               **parameters}
    flow_run = create_flow_run(rollback, request)
    responder = None
    if approval is not None:
        responder = PauseResponder(flow_run.id, approval, PLAN_ARTIFACT)
        responder.start()
    try:
        state = execute_flow_run(rollback, flow_run, request)
    finally:
        if responder is not None:
            responder.stop()
            responder.join(10)
    return state


def failure(state) -> BaseException:
    assert state.is_failed(), f"expected a failed run, got {state.name}"
    return state.result(raise_on_failure=False)


def container(env: dict) -> ContainerClient:
    service = BlobServiceClient.from_connection_string(
        env["UE_SANDBOX_BLOB_CONNECTION_STRING"]
    )
    return service.get_container_client("evidence")


def blob_names(env: dict, prefix: str) -> list[str]:
    client = container(env)
    if not client.exists():
        return []
    return sorted(client.list_blob_names(name_starts_with=prefix))


def blobs_besides_evidence(env: dict, org: str) -> list[str]:
    """Return the blobs under `<org>/` other than evidence records and their head."""
    prefix = f"{org}/"
    return [name for name in blob_names(env, prefix)
            if not is_evidence_blob(name, prefix)]


def rollback_record(env: dict, org: str, state: State) -> dict:
    """Download the evidence record that the rollback run of `state` wrote."""
    run_id = str(state.state_details.flow_run_id)
    names = [name for name in blob_names(env, f"{org}/rollback/")
             if f"/{run_id}/" in name]
    assert len(names) == 1, names
    return json.loads(container(env).download_blob(names[0]).readall())


def check_statuses(record: dict) -> dict[str, str]:
    return {check["id"]: check["status"] for check in record["checks"]}


def status_document(env: dict) -> dict:
    client = container(env)
    if not client.get_blob_client("pilot-status.json").exists():
        return {"orgs": {}, "history": []}
    return json.loads(client.download_blob("pilot-status.json").readall())


def clerk_state(env: dict) -> dict:
    return httpx.get(env["UE_SANDBOX_CLERK_URL"] + "/sandbox/state").json()


def clerk_org(env: dict, org: str) -> dict:
    return next(o for o in clerk_state(env)["organizations"] if o["id"] == org)


def active_sessions(env: dict, org: str) -> list[dict]:
    state = clerk_state(env)
    members = {m["user_id"] for m in state["memberships"]
               if m["organization_id"] == org}
    return [s for s in state["sessions"]
            if s["user_id"] in members and s["status"] == "active"]


def notifications(env: dict, org: str) -> list[dict]:
    received = httpx.get(env["UE_SANDBOX_NOTIFY_URL"] + "/sandbox/notifications")
    return [n for n in received.json() if n["body"].get("org") == org]


def artifacts_of(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
    return {artifact.key: json.dumps(artifact.data, default=str) for artifact in found}


def logs_of(flow_run_id) -> str:
    # Prefect sends log records in batches; send the pending ones first.
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        found = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return "\n".join(log.message for log in found)


def assert_untouched(env: dict, org: str) -> None:
    """Check that nothing of `org` changed: Clerk, sessions, blobs, notices."""
    assert "ue_pilot_status" not in clerk_org(env, org)["public_metadata"]
    assert len(active_sessions(env, org)) == 3
    assert notifications(env, org) == []
    assert blob_names(env, f"{org}/") == []
    assert blob_names(env, f"rollback/{org}/") == []
    assert org not in status_document(env)["orgs"]


@dataclass
class FinishedRun:
    """A finished rollback run: its state, result, artifacts by key and log text."""

    state: State
    result: object
    artifacts: dict[str, str]
    logs: str


class ActiveOrgTraffic:
    """Sign-ins of an org that stays active, as other pilot orgs keep using UE.

    They give telemetry rows newer than each disable, which the verify step
    waits for before zero sign-ins of the disabled org count.
    """

    def __init__(self, env: dict, org: str) -> None:
        token = json.loads(env["UE_PROBE_SESSIONS"])[org]["admin"]
        self.url = env["UE_BASE_URL"] + "/api/analytics/cross-org"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(headers=self.headers, timeout=10) as client:
            while not self.stopping.wait(1.0):
                try:
                    client.get(self.url)
                except httpx.HTTPError:
                    pass

    def __enter__(self) -> ActiveOrgTraffic:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self.thread.join(10)


def sandbox_env(sandbox: SandboxProcess, **overrides: str) -> dict:
    return {**sandbox.env, **FAST, **overrides}


@pytest.fixture(scope="module")
def sandbox(prefect_server) -> Iterator[SandboxProcess]:
    with SandboxProcess(orgs=5, storage=True) as running:
        with ActiveOrgTraffic(running.env, ORG_ACTIVE):
            yield running


@pytest.fixture
def env(ue_env, sandbox) -> dict:
    values = sandbox_env(sandbox)
    ue_env(values)
    return values


@pytest.fixture(scope="module")
def rolled_back(sandbox):
    """The first rollback of ORG_DONE, with its state and the run's artifacts."""
    patch = pytest.MonkeyPatch()
    for name, value in sandbox_env(sandbox).items():
        patch.setenv(name, value)
    try:
        state = run_rollback(ORG_DONE, approval_input(ORG_DONE))
        result = state.result(raise_on_failure=False)
        flow_run_id = state.state_details.flow_run_id
        yield FinishedRun(
            state, result, artifacts_of(flow_run_id), logs_of(flow_run_id)
        )
    finally:
        patch.undo()


# A full rollback


def test_rollback_completes(rolled_back):
    """A rollback approved by another person completes with every step done."""
    state, result = rolled_back.state, rolled_back.result
    assert state.is_completed(), result
    assert result["outcome"] == "rolled-back"
    assert [row["outcome"] for row in result["steps"]] == ["done"] * 6


def test_rollback_disables_org_in_clerk(rolled_back, env):
    """The org's public metadata carries the disabled flag; the org still exists."""
    metadata = clerk_org(env, ORG_DONE)["public_metadata"]
    assert metadata["ue_pilot_status"] == "disabled"
    assert metadata["ue_pilot_status_details"]["rollback_id"] == (
        rolled_back.result["rollback_id"]
    )


def test_rollback_keeps_memberships(rolled_back, env):
    """Every membership stays as the audit trail."""
    memberships = [m for m in clerk_state(env)["memberships"]
                   if m["organization_id"] == ORG_DONE]
    assert len(memberships) == 3


def test_rollback_revokes_member_sessions(rolled_back, env):
    """No member of the org has an active Clerk session afterwards."""
    assert active_sessions(env, ORG_DONE) == []
    assert "3 session(s) revoked" in rolled_back.result["steps"][2]["detail"]


def test_rollback_verifies_with_telemetry(rolled_back):
    """The verify step saw telemetry newer than the disable and no sign-in."""
    verify = rolled_back.result["steps"][3]
    assert verify["outcome"] == "done"
    assert "no auth_success since the disable" in verify["detail"]


def test_rollback_notifies_contact_once(rolled_back, env):
    """The webhook got one notice naming the org, with an idempotency key."""
    received = notifications(env, ORG_DONE)
    assert len(received) == 1
    assert received[0]["body"]["approved_by"] == APPROVER
    assert received[0]["idempotency_key"] == (
        f"{rolled_back.result['rollback_id']}-notify"
    )


def test_rollback_archives_every_blob(rolled_back, env):
    """Only evidence is left under <org>/ and the export is under archived/<org>/."""
    assert blobs_besides_evidence(env, ORG_DONE) == []
    archived = blob_names(env, f"archived/{ORG_DONE}/exports/")
    assert any(name.endswith("/manifest.json") for name in archived)
    assert any(name.endswith("/rewards.csv") for name in archived)


def test_rollback_reports_archive_manifest(rolled_back, env):
    """The result names the archive manifest, and the manifest blob exists."""
    manifest = rolled_back.result["archive"]["manifest"]
    assert manifest["blobs"] >= 3
    assert container(env).get_blob_client(manifest["blob"]).exists()
    assert "rollback-archive-manifest" in rolled_back.artifacts


def test_rollback_updates_status_document(rolled_back, env):
    """The status document marks the org rolled back and keeps a history entry."""
    result = rolled_back.result
    document = status_document(env)
    entry = document["orgs"][ORG_DONE]
    assert entry["status"] == "rolled-back"
    assert entry["approver"] == APPROVER
    assert entry["reason"] == REASON
    assert entry["run_id"] == result["run_id"]
    assert entry in document["history"]
    assert result["status_document"]["etag"]


def test_rollback_records_approval(rolled_back):
    """The approval's who, when and comment are in the result and an artifact."""
    approval = rolled_back.result["approval"]
    assert approval["approver"] == APPROVER
    assert approval["comment"] == "checked the plan"
    assert approval["approved_at"]
    assert APPROVER in rolled_back.artifacts["rollback-approval"]


def test_rollback_plan_shows_org(rolled_back):
    """The plan lists the members, their sessions, the blobs and the exports."""
    plan = rolled_back.result["plan"]
    assert len(plan["members"]) == 3
    assert len(plan["active_sessions"]) == 3
    assert plan["exports"] == ["rewards", "tax-cra"]
    assert "Rollback plan: org_sandbox0001" in rolled_back.artifacts[PLAN_ARTIFACT]


def test_rollback_marks_record_completed(rolled_back, env):
    """The rollback record lists every step and is closed."""
    record = json.loads(
        container(env).download_blob(f"rollback/{ORG_DONE}/state.json").readall()
    )
    assert record["state"] == "completed"
    assert sorted(record["steps"]) == sorted(
        ["notify", "export", "disable", "verify", "archive", "status"]
    )


def test_rollback_keeps_secrets_out(rolled_back, env):
    """No webhook token, Clerk key or session token is in result, artifacts or logs."""
    secrets = [env["UE_NOTIFY_WEBHOOK_URL"].rsplit("/", 1)[1],
               env["UE_CLERK_SECRET_KEY"], env["UE_BLOB_CONNECTION_STRING"]]
    secrets += [token for roles in json.loads(env["UE_PROBE_SESSIONS"]).values()
                for token in roles.values()]
    text = "".join([json.dumps(rolled_back.result, default=str),
                    *rolled_back.artifacts.values(), rolled_back.logs])
    assert "rolled back" in rolled_back.logs
    for secret in secrets:
        assert secret not in text


def test_rollback_writes_evidence_record(rolled_back, env):
    """The record contains the approval and every step as a passed check."""
    record = rollback_record(env, ORG_DONE, rolled_back.state)
    assert record["family"] == "rollback"
    assert record["verdict"] == "pass"
    assert [check["id"] for check in record["checks"]] == RECORD_CHECKS
    assert set(check_statuses(record).values()) == {"pass"}
    assert record["target"]["outcome"] == "rolled-back"


def test_rollback_record_contains_approval(rolled_back, env):
    """The record names the approver, the time, the comment and the plan."""
    record = rollback_record(env, ORG_DONE, rolled_back.state)
    approval = record["target"]["approval"]
    assert approval["approver"] == APPROVER
    assert approval["approved_at"] == rolled_back.result["approval"]["approved_at"]
    assert approval["comment"] == "checked the plan"
    assert record["target"]["requested_by"] == REQUESTER
    assert len(record["target"]["plan"]["members"]) == 3


def test_rollback_record_hashes_archive_manifest(rolled_back, env):
    """The record lists the archive manifest with the sha256 of its stored bytes."""
    record = rollback_record(env, ORG_DONE, rolled_back.state)
    manifest = rolled_back.result["archive"]["manifest"]
    data = container(env).download_blob(manifest["blob"]).readall()
    (artifact,) = record["artifacts"]
    assert artifact["name"] == "archive_manifest"
    assert artifact["blob"] == manifest["blob"]
    assert artifact["sha256"] == hashlib.sha256(data).hexdigest()


def test_rollback_record_contains_status_etag(rolled_back, env):
    """The status document check carries the etag the document was written with."""
    record = rollback_record(env, ORG_DONE, rolled_back.state)
    (check,) = [c for c in record["checks"] if c["id"] == "rollback.status_document"]
    assert check["observed"]["result"]["etag"] == (
        rolled_back.result["status_document"]["etag"]
    )


def test_rollback_record_continues_chain(rolled_back, env):
    """The export's archived record and the rollback's record form one chain."""
    report = verify_chain(container(env), ORG_DONE)
    assert report.status == "intact"
    assert [r.content["family"] for r in report.chain()] == ["export", "rollback"]


def test_second_rollback_changes_nothing(rolled_back, env):
    """A second run reports "already rolled back" and changes nothing."""
    before = (status_document(env), clerk_org(env, ORG_DONE)["updated_at"],
              blob_names(env, f"archived/{ORG_DONE}/"))
    state = run_rollback(ORG_DONE, approval_input(ORG_DONE))
    result = state.result()
    assert result["outcome"] == "already-rolled-back"
    assert "already rolled back" in result["message"]
    assert status_document(env) == before[0]
    assert clerk_org(env, ORG_DONE)["updated_at"] == before[1]
    assert blob_names(env, f"archived/{ORG_DONE}/") == before[2]
    assert len(notifications(env, ORG_DONE)) == 1


def test_evidence_records_do_not_reopen_rollback(rolled_back, env):
    """Evidence records written under <org>/ after the archive leave it rolled back."""
    client = container(env)
    record = f"{ORG_DONE}/isolation-audit/2030/01/run-1/record.json"
    client.upload_blob(record, b"{}")
    try:
        left = blob_names(env, f"{ORG_DONE}/")
        result = run_rollback(ORG_DONE, approval_input(ORG_DONE)).result()
    finally:
        client.delete_blob(record)
    assert result["outcome"] == "already-rolled-back"
    assert f"{ORG_DONE}/evidence-head.json" in left
    assert record in left
    assert result["plan"]["blobs"]["evidence_records"] == len(left)


# Approvals and requests that change nothing


def test_dry_run_changes_nothing(env):
    """A dry run completes with the plan and changes nothing."""
    state = run_rollback(ORG_UNTOUCHED, dry_run=True)
    result = state.result()
    assert result["outcome"] == "dry-run"
    assert "Blobs to archive" in result["plan_markdown"]
    assert_untouched(env, ORG_UNTOUCHED)


def test_approval_with_wrong_org_id_rejected(env):
    """Typing another org's id fails the run before any change."""
    error = failure(run_rollback(ORG_UNTOUCHED, approval_input(ORG_DONE)))
    assert isinstance(error, ApprovalRejectedError)
    assert f"the typed org id {ORG_DONE!r}" in str(error)
    assert_untouched(env, ORG_UNTOUCHED)


def test_approval_by_requester_rejected(env):
    """The requester cannot approve, whatever the case and spacing of the name."""
    error = failure(
        run_rollback(ORG_UNTOUCHED, approval_input(ORG_UNTOUCHED, " rita REQUESTER "))
    )
    assert isinstance(error, ApprovalRejectedError)
    assert "cannot also approve" in str(error)
    assert_untouched(env, ORG_UNTOUCHED)


def test_approval_with_empty_name_rejected(env):
    """An approval without a name fails the run before any change."""
    error = failure(run_rollback(ORG_UNTOUCHED, approval_input(ORG_UNTOUCHED, "   ")))
    assert isinstance(error, ApprovalRejectedError)
    assert_untouched(env, ORG_UNTOUCHED)


def test_approval_timeout_changes_nothing(env, monkeypatch):
    """Without approval the run fails at the timeout, reporting that nothing changed."""
    monkeypatch.setenv("UE_ROLLBACK_APPROVAL_TIMEOUT_SECONDS", "3")
    state = run_rollback(ORG_UNTOUCHED)
    assert state.is_failed()
    # The server fails a run whose pause expired with its own message.
    assert "never resumed" in state.message
    approval = artifacts_of(state.state_details.flow_run_id)["rollback-approval"]
    assert "approval timed out after 3 s; nothing was changed" in approval
    assert_untouched(env, ORG_UNTOUCHED)


@pytest.mark.parametrize(
    "org_id",
    ["", "..", "*", "org_sandbox000", "org_sandbox0002/..", "org_nosuchorg1"],
    ids=["empty", "dots", "wildcard", "prefix", "path", "unknown"],
)
def test_bad_org_id_rejected(env, org_id):
    """A bad org id fails the run before the plan, and nothing changes."""
    error = failure(run_rollback(org_id, approval_input(org_id)))
    assert isinstance(error, InvalidOrgIdError)
    assert repr(org_id) in str(error) or ascii(org_id) in str(error)
    assert_untouched(env, ORG_UNTOUCHED)


def test_prefix_org_id_names_longer_org(env):
    """A prefix of a pilot org id is rejected with that org named."""
    error = failure(run_rollback("org_sandbox000", approval_input("org_sandbox000")))
    assert "org_sandbox0001" in str(error)


def test_slug_rejected_as_org_id(env, monkeypatch):
    """An org's slug, which Clerk's lookup also matches, is rejected."""
    monkeypatch.setenv("UE_ORG_ID_PATTERN", r"^org[-_][a-z0-9]+$")
    error = failure(run_rollback("org-sandbox0002", approval_input("org-sandbox0002")))
    assert isinstance(error, UnknownOrgError)
    assert "slug" in str(error)
    assert_untouched(env, ORG_UNTOUCHED)


def test_empty_reason_rejected(env):
    """A rollback without a reason fails before any change."""
    state = run_rollback(ORG_UNTOUCHED, approval_input(ORG_UNTOUCHED), reason=" ")
    error = failure(state)
    assert isinstance(error, RollbackRequestError)
    assert_untouched(env, ORG_UNTOUCHED)


def test_missing_webhook_rejected_early(env, monkeypatch):
    """Without UE_NOTIFY_WEBHOOK_URL the run fails before the plan and the pause."""
    monkeypatch.setenv("UE_NOTIFY_WEBHOOK_URL", "")
    state = run_rollback(ORG_UNTOUCHED, approval_input(ORG_UNTOUCHED))
    error = failure(state)
    assert isinstance(error, RollbackRequestError)
    assert "UE_NOTIFY_WEBHOOK_URL" in str(error)
    assert_untouched(env, ORG_UNTOUCHED)


# A failure mid-way, then a second run


def test_second_run_continues_after_failure(env, monkeypatch):
    """A run that fails after the disable is continued by the next run."""
    with monkeypatch.context() as patch:
        # Without a Logs target the verify step cannot prove anything.
        patch.setenv("UE_LOGS_RESOURCE_ID", "")
        patch.setenv("UE_LOGS_WORKSPACE_ID", "")
        failed_state = run_rollback(ORG_RESUMED, approval_input(ORG_RESUMED))
    error = failure(failed_state)
    failed_record = rollback_record(env, ORG_RESUMED, failed_state)
    assert isinstance(error, VerificationInconclusiveError)
    assert check_statuses(failed_record)["rollback.sessions"] == "inconclusive"
    assert failed_record["verdict"] == "inconclusive"
    assert "ue_pilot_status" in clerk_org(env, ORG_RESUMED)["public_metadata"]
    exported = blob_names(env, f"{ORG_RESUMED}/")
    assert exported, "the export of the failed run is still under <org>/"
    assert ORG_RESUMED not in status_document(env)["orgs"]

    state = run_rollback(ORG_RESUMED, approval_input(ORG_RESUMED, "Sam Second"))
    result = state.result(raise_on_failure=False)
    assert state.is_completed(), result
    outcomes = {row["step"][3:]: row["outcome"] for row in result["steps"]}
    assert outcomes == {
        "Notify the pilot org contact": "skipped",
        "Export all org data": "skipped",
        "Disable the org in Clerk": "skipped",
        "Verify no active sessions remain": "done",
        "Archive blob storage artifacts": "done",
        "Update the pilot status document": "done",
    }
    assert len(notifications(env, ORG_RESUMED)) == 1
    assert blobs_besides_evidence(env, ORG_RESUMED) == []
    archived = blob_names(env, f"archived/{ORG_RESUMED}/")
    assert sorted(f"archived/{name}" for name in exported) == archived
    assert status_document(env)["orgs"][ORG_RESUMED]["approver"] == "Sam Second"


# The command line


def test_cli_rollback_dry_run(env):
    """`ue-pilot rollback --dry-run` prints the plan and changes nothing."""
    outcome = CliRunner().invoke(main, [
        "rollback", "--org", ORG_UNTOUCHED, "--reason", REASON,
        "--requested-by", REQUESTER, "--dry-run",
    ])
    assert outcome.exit_code == 0, outcome.output
    assert "# Rollback plan: org_sandbox0002" in outcome.output
    assert_untouched(env, ORG_UNTOUCHED)


def test_cli_rollback_bad_org_exits_2(env):
    """An invalid org id is a usage error, exit status 2."""
    outcome = CliRunner().invoke(main, [
        "rollback", "--org", "org_sandbox000", "--reason", REASON,
        "--requested-by", REQUESTER, "--approve-as", APPROVER,
    ])
    assert outcome.exit_code == 2
    assert "org_sandbox0001" in outcome.output


def test_cli_rollback_without_webhook_exits_2(env, monkeypatch):
    """A missing webhook is a usage error before the plan, exit status 2."""
    monkeypatch.setenv("UE_NOTIFY_WEBHOOK_URL", "")
    outcome = CliRunner().invoke(main, [
        "rollback", "--org", ORG_UNTOUCHED, "--reason", REASON,
        "--requested-by", REQUESTER, "--approve-as", APPROVER,
    ])
    assert outcome.exit_code == 2
    assert "UE_NOTIFY_WEBHOOK_URL" in outcome.output
    assert "Rollback plan" not in outcome.output
    assert_untouched(env, ORG_UNTOUCHED)


def test_cli_rollback_approves(env):
    """`ue-pilot rollback --approve-as` shows the plan, approves and rolls back."""
    outcome = CliRunner().invoke(main, [
        "rollback", "--org", ORG_CLI, "--reason", REASON,
        "--requested-by", REQUESTER, "--approve-as", APPROVER,
    ])
    assert outcome.exit_code == 0, outcome.output
    assert "# Rollback plan: org_sandbox0004" in outcome.output
    assert f"{ORG_CLI} rolled back" in outcome.output
    assert status_document(env)["orgs"][ORG_CLI]["approver"] == APPROVER


# Sandbox faults


@pytest.fixture(scope="module")
def faulty_sandbox(prefect_server) -> Iterator[SandboxProcess]:
    """Clerk returns 429 for every third request and Copy Blob always fails."""
    faults = ["clerk-rate-limited", "blob-copy-fails"]
    with SandboxProcess(orgs=3, storage=True, faults=faults) as running:
        with ActiveOrgTraffic(running.env, "org_sandbox0003"):
            yield running


def test_rollback_completes_when_clerk_rate_limited(faulty_sandbox, ue_env):
    """Clerk's 429 responses are retried, so the rollback still completes."""
    direct = faulty_sandbox.env["UE_SANDBOX_BLOB_CONNECTION_STRING"]
    env = sandbox_env(faulty_sandbox, UE_BLOB_CONNECTION_STRING=direct)
    ue_env(env)
    state = run_rollback("org_sandbox0002", approval_input("org_sandbox0002"))
    assert state.is_completed(), state.result(raise_on_failure=False)
    stats = httpx.get(env["UE_SANDBOX_CLERK_URL"] + "/sandbox/stats").json()
    assert stats["by_status"].get("429", 0) > 0


def test_rollback_resumes_after_blob_copy_fails(faulty_sandbox, ue_env):
    """Failed copies stop the rollback with every source kept; a re-run completes."""
    org = "org_sandbox0001"
    # Without the SDK's own retries each failed copy fails at once.
    env = sandbox_env(faulty_sandbox, UE_BLOB_RETRY_TOTAL="0")
    ue_env(env)
    error = failure(run_rollback(org, approval_input(org)))
    assert isinstance(error, ArchiveCopyError)
    sources = blob_names(env, f"{org}/")
    assert any(name.endswith("/manifest.json") for name in sources)
    assert org not in status_document(env)["orgs"]

    direct = faulty_sandbox.env["UE_SANDBOX_BLOB_CONNECTION_STRING"]
    ue_env({**env, "UE_BLOB_CONNECTION_STRING": direct})
    state = run_rollback(org, approval_input(org))
    assert state.is_completed(), state.result(raise_on_failure=False)
    assert blobs_besides_evidence(env, org) == []
    assert sorted(f"archived/{name}" for name in sources) == blob_names(
        env, f"archived/{org}/"
    )


@pytest.fixture(scope="module")
def surviving_sessions_sandbox(prefect_server) -> Iterator[SandboxProcess]:
    """Clerk reports revoked sessions as revoked but keeps them active."""
    with SandboxProcess(orgs=2, storage=True,
                        faults=["session-survives-revoke"]) as running:
        yield running


@pytest.fixture(scope="module")
def sessions_survive(surviving_sessions_sandbox) -> Iterator[State]:
    """The final state of a rollback of org_sandbox0001 whose sessions survive."""
    org = "org_sandbox0001"
    patch = pytest.MonkeyPatch()
    for name, value in sandbox_env(surviving_sessions_sandbox).items():
        patch.setenv(name, value)
    try:
        yield run_rollback(org, approval_input(org))
    finally:
        patch.undo()


def test_surviving_sessions_stop_rollback(
    sessions_survive, surviving_sessions_sandbox, ue_env
):
    """The verify step fails listing the sessions, and nothing is archived."""
    org = "org_sandbox0001"
    env = sandbox_env(surviving_sessions_sandbox)
    ue_env(env)
    error = failure(sessions_survive)
    assert isinstance(error, SessionsRemainError)
    for session in active_sessions(env, org):
        assert session["id"] in str(error)
    assert blob_names(env, f"{org}/") != []
    assert blob_names(env, f"archived/{org}/") == []
    assert org not in status_document(env)["orgs"]


def test_failed_rollback_writes_evidence_record(
    sessions_survive, surviving_sessions_sandbox
):
    """The failed step fails its check, and the steps after it are inconclusive."""
    env = sandbox_env(surviving_sessions_sandbox)
    record = rollback_record(env, "org_sandbox0001", sessions_survive)
    statuses = check_statuses(record)
    assert [check["id"] for check in record["checks"]] == RECORD_CHECKS
    assert record["verdict"] == "fail"
    assert statuses["rollback.disable"] == "pass"
    assert statuses["rollback.sessions"] == "fail"
    assert statuses["rollback.archive"] == "inconclusive"
    assert statuses["rollback.status_document"] == "inconclusive"
    assert record["target"]["outcome"] == "failed"
    assert record["target"]["failure"].startswith("SessionsRemainError: ")


@pytest.mark.parametrize("clerk_status", ["active", "disabled"])
def test_plan_warns_disabled_org(clerk_status):
    """A plan for an org that is already disabled warns that the export may fail."""
    blobs = {"prefix": "org_x/", "count": 2, "bytes": 10, "evidence_records": 0}
    plan = {
        "org": "org_x", "org_name": "X", "clerk_status": clerk_status,
        "members": [], "active_sessions": [], "blobs": blobs,
        "archived": {**blobs, "prefix": "archived/org_x/", "count": 0},
        "exports": ["rewards"], "pilot_status": None, "rollback": None,
        "already_rolled_back": False, "container": "evidence",
        "status_blob": "pilot-status.json", "approval_timeout_seconds": 3600,
    }
    markdown = render_plan(plan, "pilot ended", "Ana")
    warned = "**The org is already disabled in Clerk**" in markdown
    assert warned is (clerk_status == "disabled")


def test_interrupted_rollback_writes_record(
    surviving_sessions_sandbox, ue_env, monkeypatch
):
    """A Ctrl-C during the export ends the run with a record of what was done.

    KeyboardInterrupt is used for both interrupts: a TerminationSignal raised
    in process makes Prefect send SIGTERM to the test process itself.
    """
    import flows.rollback as rollback_module

    def terminated(settings, org):
        raise KeyboardInterrupt

    org = "org_sandbox0002"
    env = sandbox_env(surviving_sessions_sandbox)
    ue_env(env)
    monkeypatch.setattr(rollback_module, "export_org", terminated)
    with pytest.raises(KeyboardInterrupt):
        run_rollback(org, approval_input(org))

    names = [name for name in blob_names(env, f"{org}/rollback/")
             if name.endswith("/record.json")]
    assert len(names) == 1, names
    record = json.loads(container(env).download_blob(names[0]).readall())
    statuses = check_statuses(record)
    assert record["target"]["outcome"] == "failed"
    assert record["target"]["failure"].startswith("KeyboardInterrupt")
    assert statuses["rollback.notify"] == "pass"
    assert statuses["rollback.export"] == "fail"
    assert statuses["rollback.disable"] == "inconclusive"
    assert clerk_org(env, org)["public_metadata"].get("ue_pilot_status") != "disabled"
