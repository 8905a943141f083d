"""Result storage: JSON results in a folder or an Azure Blob container (Azurite),
stored under a key that contains the flow run id."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient
from prefect import flow

from flows.export_all import export_all
from flows.isolation_audit import isolation_audit
from tasks.paging import page_flow_crash
from ue_pilot.results import key_results_by_run, result_storage
from ue_pilot.sandbox.azurite import Azurite
from ue_pilot.settings import FlowRunSettings

ROOT = Path(__file__).resolve().parent.parent


def keyed_flow(storage):
    """Build a flow that stores its result in `storage` the way the real flows do."""

    @flow(
        name="results-probe",
        persist_result=True,
        result_storage=storage,
        result_serializer="json",
    )
    def results_probe(value: int) -> dict:
        key_results_by_run()
        return {"value": value}

    return results_probe


def test_result_storage_defaults_to_folder(tmp_path, monkeypatch):
    """Without a block, results go to UE_RESULT_STORAGE_PATH as an absolute folder."""
    monkeypatch.chdir(tmp_path)
    storage = result_storage(FlowRunSettings())
    assert storage == tmp_path / ".prefect" / "results"


def test_result_storage_block_is_azure_container():
    """UE_RESULT_STORAGE_BLOCK names a saved AzureBlobStorageContainer block."""
    storage = result_storage(FlowRunSettings(result_storage_block="ue-results"))
    assert storage == "azure-blob-storage-container/ue-results"


@pytest.mark.parametrize("name", ["UE Results", "../x", "a/b", "Results"])
def test_result_storage_block_rejects_invalid_name(name):
    """A block name Prefect cannot have is rejected with the setting's name."""
    with pytest.raises(ValueError, match="UE_RESULT_STORAGE_BLOCK"):
        FlowRunSettings(result_storage_block=name)


@pytest.mark.parametrize("flow_object", [isolation_audit, export_all],
                         ids=["isolation-audit", "export-all"])
def test_flows_persist_json_results(flow_object):
    """The flows persist their results as JSON in the configured storage."""
    assert flow_object.persist_result is True
    assert flow_object.result_serializer == "json"
    assert flow_object.result_storage == result_storage()


@pytest.mark.parametrize("flow_object", [isolation_audit, export_all],
                         ids=["isolation-audit", "export-all"])
def test_flows_page_on_crash_and_timeout(flow_object):
    """The flows have a time limit and page when a run crashes or times out."""
    assert flow_object.timeout_seconds > 0
    assert page_flow_crash in flow_object.on_crashed_hooks
    assert page_flow_crash in flow_object.on_failure_hooks


def test_flow_timeouts_follow_settings():
    """UE_AUDIT_TIMEOUT_SECONDS and UE_EXPORT_TIMEOUT_SECONDS set the time limits."""
    script = (
        "from flows.isolation_audit import isolation_audit\n"
        "from flows.export_all import export_all\n"
        "print(isolation_audit.timeout_seconds, export_all.timeout_seconds)\n"
    )
    env = os.environ | {
        "UE_AUDIT_TIMEOUT_SECONDS": "42",
        "UE_EXPORT_TIMEOUT_SECONDS": "4200",
    }
    output = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=120, check=True,
    ).stdout
    assert output.split() == ["42.0", "4200.0"]


def test_result_key_holds_run_id(prefect_server, tmp_path):
    """A flow result is stored at `<flow>/<run id>/result.json`, as JSON."""
    probe = keyed_flow(tmp_path)
    state = probe(7, return_state=True)
    run_id = state.state_details.flow_run_id
    stored = tmp_path / "results-probe" / str(run_id) / "result.json"
    assert stored.exists()
    assert json.loads(stored.read_text()) == {"value": 7}
    assert state.result() == {"value": 7}


def test_result_key_differs_per_run(prefect_server, tmp_path):
    """Two runs of the same flow with the same input store two results."""
    probe = keyed_flow(tmp_path)
    first = probe(1, return_state=True).state_details.flow_run_id
    second = probe(1, return_state=True).state_details.flow_run_id
    stored = sorted(p.parent.name for p in tmp_path.rglob("result.json"))
    assert stored == sorted([str(first), str(second)])


def test_result_storage_azure_container(prefect_server):
    """With a saved prefect-azure block, results go to the Blob container."""
    from prefect_azure import AzureBlobStorageContainer, AzureBlobStorageCredentials

    name = f"ue-results-{uuid.uuid4().hex[:8]}"
    with Azurite.start() as azurite:
        service = BlobServiceClient.from_connection_string(azurite.connection_string)
        service.create_container("results")
        AzureBlobStorageContainer(
            container_name="results",
            credentials=AzureBlobStorageCredentials(
                connection_string=azurite.connection_string
            ),
        ).save(name)
        storage = result_storage(FlowRunSettings(result_storage_block=name))
        state = keyed_flow(storage)(3, return_state=True)
        run_id = state.state_details.flow_run_id
        blobs = [b.name for b in service.get_container_client("results").list_blobs()]
        assert blobs == [f"results-probe/{run_id}/result.json"]
        assert state.result() == {"value": 3}
