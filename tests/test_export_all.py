"""The export-all flow against the sandbox application and Azurite."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import pytest
from azure.storage.blob import BlobServiceClient

from flows.export_all import ExportConfigurationError, export_all
from ue_pilot.orgids import InvalidOrgIdError
from ue_pilot.sandbox.runner import SandboxProcess

ORG = "org_sandbox0001"


@pytest.fixture(scope="module")
def sandbox():
    with SandboxProcess(orgs=3, storage=True) as running:
        yield running


@pytest.fixture
def env(ue_env, sandbox):
    ue_env(sandbox.env)
    return sandbox.env


def container(env) -> object:
    service = BlobServiceClient.from_connection_string(
        env["UE_SANDBOX_BLOB_CONNECTION_STRING"]
    )
    return service.get_container_client("evidence")


def fetch_source(env, url: str) -> bytes:
    token = json.loads(env["UE_PROBE_SESSIONS"])[ORG]["admin"]
    response = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
    response.raise_for_status()
    return response.content


@pytest.fixture(scope="module")
def manifest(prefect_server, sandbox):
    patch = pytest.MonkeyPatch()
    for name, value in sandbox.env.items():
        patch.setenv(name, value)
    try:
        yield export_all(ORG)
    finally:
        patch.undo()


def test_manifest_lists_every_export(manifest):
    """The manifest has one entry per configured export."""
    assert [e["name"] for e in manifest["exports"]] == ["rewards", "tax-cra"]


def test_blobs_match_source_bytes(manifest, env):
    """Each stored blob is byte-identical to the API's response."""
    client = container(env)
    for entry in manifest["exports"]:
        stored = client.download_blob(entry["blob"]).readall()
        assert stored == fetch_source(env, entry["source_url"])


def test_manifest_hashes_match_blobs(manifest, env):
    """Size and sha256 in the manifest are those of the stored bytes."""
    client = container(env)
    for entry in manifest["exports"]:
        stored = client.download_blob(entry["blob"]).readall()
        assert len(stored) == entry["bytes"]
        assert hashlib.sha256(stored).hexdigest() == entry["sha256"]


def test_content_md5_is_set(manifest, env):
    """Every export blob carries Content-MD5 of its bytes."""
    client = container(env)
    for entry in manifest["exports"]:
        properties = client.get_blob_client(entry["blob"]).get_blob_properties()
        stored = client.download_blob(entry["blob"]).readall()
        assert (
            bytes(properties.content_settings.content_md5)
            == hashlib.md5(stored).digest()
        )


def test_row_counts_match_database(manifest):
    """The sandbox seeds 50 rewards and 20 tax slips per org."""
    rows = {e["name"]: e["rows"] for e in manifest["exports"]}
    assert rows == {"rewards": 50, "tax-cra": 20}


def test_blob_layout(manifest):
    """Exports land under <org>/exports/<yyyy>/<mm>/<run-id>/<name>.csv."""
    parts = manifest["exports"][0]["blob"].split("/")
    assert parts[0] == ORG
    assert parts[1] == "exports"
    assert parts[4] == manifest["run_id"]
    assert parts[5] == "rewards.csv"


def test_manifest_blob_stored(manifest, env):
    """manifest.json is stored beside the exports with the same content."""
    stored = json.loads(
        container(env).download_blob(manifest["manifest_blob"]["blob"]).readall()
    )
    assert stored["exports"] == manifest["exports"]


def test_no_token_anywhere(manifest, env):
    """No session token is in the manifest, a blob's bytes or its metadata."""
    tokens = [
        t
        for roles in json.loads(env["UE_PROBE_SESSIONS"]).values()
        for t in roles.values()
    ]
    client = container(env)
    texts = [json.dumps(manifest)]
    for blob in client.list_blobs(name_starts_with=ORG, include=["metadata"]):
        texts.append(client.download_blob(blob.name).readall().decode("utf-8-sig"))
        texts.append(json.dumps(blob.metadata))
    leaked = [t for t in tokens for text in texts if t in text]
    assert leaked == []


def test_rerun_writes_new_folder(manifest, env, prefect_server):
    """A second export never overwrites the first: it gets its own run folder."""
    second = export_all(ORG)
    assert second["folder"] != manifest["folder"]
    assert container(env).get_blob_client(manifest["exports"][0]["blob"]).exists()


@pytest.mark.parametrize("org", ["", "..", "org_*", "org_" + "a" * 80])
def test_bad_org_rejected_before_requests(env, prefect_server, org):
    """An invalid org id fails the flow before any request or blob."""
    before = sum(1 for _ in container(env).list_blobs())
    with pytest.raises(InvalidOrgIdError):
        export_all(org)
    assert sum(1 for _ in container(env).list_blobs()) == before


def test_unknown_export_rejected(env, prefect_server):
    """An export name that is not configured is rejected with the known names."""
    with pytest.raises(ExportConfigurationError, match="rewards"):
        export_all(ORG, exports=["payroll"])


def test_org_without_session_rejected(env, prefect_server, ue_env):
    """An org with no session in UE_PROBE_SESSIONS fails before any request."""
    with pytest.raises(ExportConfigurationError, match="UE_PROBE_SESSIONS"):
        export_all("org_nosession1")


def run_with_fault(ue_env, fault: str, bulk: int = 0, **overrides: str):
    """Run export-all once against a sandbox with `fault`, returning the state."""
    with SandboxProcess(
        orgs=2, faults=[fault], storage=True, bulk_rewards=bulk
    ) as faulty:
        ue_env(dict(faulty.env, **overrides))
        state = export_all(ORG, return_state=True)
        blobs = [b.name for b in container(faulty.env).list_blobs()]
        source = None
        if state.is_completed():
            entry = state.result()["exports"][0]
            source = fetch_source(faulty.env, entry["source_url"])
            stored = container(faulty.env).download_blob(entry["blob"]).readall()
            source = (source, stored)
        events = httpx.get(
            faulty.env["UE_PAGERDUTY_EVENTS_URL"].replace(
                "/v2/enqueue", "/sandbox/events"
            )
        ).json()
    return state, blobs, source, events


def test_truncated_stream_retried(prefect_server, ue_env):
    """A cut stream is retried and only the complete export is stored."""
    state, blobs, source, _ = run_with_fault(ue_env, "export-truncated")
    manifest = state.result()
    rows = {e["name"]: e["rows"] for e in manifest["exports"]}
    assert rows == {"rewards": 50, "tax-cra": 20}
    assert source[0] == source[1]


def test_cross_org_row_quarantined(prefect_server, ue_env):
    """A foreign row fails the export, quarantines the file and pages critical."""
    state, blobs, _, events = run_with_fault(ue_env, "export-cross-org-row")
    published = [b for b in blobs if b.startswith(f"{ORG}/exports/")]
    quarantined = [b for b in blobs if b.startswith(f"quarantine/{ORG}/")]
    pages = [e for e in events if e["dedup_key"].endswith("export.ownership")]
    assert state.is_failed()
    assert published == []
    assert len(quarantined) == 2
    assert pages[0]["payload"]["severity"] == "critical"


def test_page_drift_fails(prefect_server, ue_env):
    """Pages whose order shifts are caught, not accepted, and nothing is stored."""
    state, blobs, _, _ = run_with_fault(
        ue_env, "export-page-drift", bulk=250, UE_EXPORT_FORMAT="json"
    )
    assert state.is_failed()
    assert "served twice" in state.message or "served twice" in str(
        state.result(raise_on_failure=False)
    )
    assert not [b for b in blobs if b.endswith("manifest.json")]


def test_formula_cells_counted(prefect_server, ue_env):
    """Formula-like cells are counted in the manifest and stored unchanged."""
    state, _, source, _ = run_with_fault(ue_env, "export-formula-cells")
    rewards = state.result()["exports"][0]
    assert rewards["formula_cells"] >= 6
    assert source[0] == source[1]


def test_storage_unavailable_fails_fast(prefect_server, ue_env):
    """Unreachable storage fails the flow with the reason, before any export."""
    with SandboxProcess(orgs=2, faults=["storage-unavailable"], storage=True) as faulty:
        ue_env(dict(faulty.env, UE_BLOB_RETRY_TOTAL="0"))
        state = export_all(ORG, return_state=True)
        error = state.result(raise_on_failure=False)
    assert state.is_failed()
    assert "Blob Storage unavailable" in str(error)


def test_json_export_complete(prefect_server, ue_env, sandbox):
    """A paged JSON export stores every page and counts every row."""
    ue_env(dict(sandbox.env, UE_EXPORT_FORMAT="json"))
    manifest = export_all(ORG)
    rewards = manifest["exports"][0]
    stored = json.loads(container(sandbox.env).download_blob(rewards["blob"]).readall())
    assert rewards["rows"] == 50
    assert sum(len(page["results"]) for page in stored) == 50


def test_no_token_in_artifacts_or_logs(env, prefect_server):
    """The run's artifacts and log lines carry no session token."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    state = export_all(ORG, return_state=True)
    run_id = state.state_details.flow_run_id
    # Log records reach the API in batches, every two seconds by default.
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])
            )
        )
        logs = []
        for _ in range(40):
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
            )
            if logs:
                break
            time.sleep(0.5)
    texts = [str(a.data) + str(a.description) for a in artifacts]
    texts += [log.message for log in logs]
    tokens = [
        t
        for roles in json.loads(env["UE_PROBE_SESSIONS"]).values()
        for t in roles.values()
    ]
    assert len(artifacts) >= 4
    assert logs
    assert [t for t in tokens for text in texts if t in text] == []
