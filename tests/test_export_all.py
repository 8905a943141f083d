"""The export-all flow against the sandbox application and Azurite."""

from __future__ import annotations

import hashlib
import json

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
