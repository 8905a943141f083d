"""Result storage of the flows: a folder or an Azure Blob container, and the key
of each result.

Results are JSON (never pickle) in a local folder by default, or in an Azure
Blob container through a saved prefect-azure `AzureBlobStorageContainer` block
named by UE_RESULT_STORAGE_BLOCK. Each result is stored under
`<flow name>/<flow run id>/`, so one run can never read or overwrite another
run's result.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from uuid import UUID

from prefect.context import FlowRunContext, TaskRunContext

from ue_pilot.settings import FlowRunSettings

# Block type slug of prefect_azure.AzureBlobStorageContainer (prefect-azure 0.4.13).
AZURE_CONTAINER_BLOCK_TYPE = "azure-blob-storage-container"


@cache
def flow_run_settings() -> FlowRunSettings:
    """Return the flow run settings, read once when the first flow module loads."""
    return FlowRunSettings()


def result_storage(settings: FlowRunSettings | None = None) -> Path | str:
    """Return the `result_storage` of a flow: a block slug or an absolute folder.

    A folder is given as a Path because Prefect 3.9 accepts a block object as
    flow result storage only once it is saved on the server.
    """
    settings = settings or flow_run_settings()
    if settings.result_storage_block:
        return f"{AZURE_CONTAINER_BLOCK_TYPE}/{settings.result_storage_block}"
    return Path(settings.result_storage_path).expanduser().resolve()


def result_key(flow_name: str, flow_run_id: UUID) -> str:
    """Return the storage key of the next result of a flow run.

    The flow's own return value is stored as `result.json`, and a task that
    persists its result gets its task run id as the file name.
    """
    task_run = TaskRunContext.get()
    leaf = f"task-{task_run.task_run.id}" if task_run else "result"
    return f"{flow_name}/{flow_run_id}/{leaf}.json"


def key_results_by_run() -> None:
    """Store the results of the current flow run under `<flow name>/<run id>/`.

    Call it first in a flow body. Prefect 3.9 takes `result_storage_key` on
    tasks only and names a flow's result with a random uuid4, so this replaces
    the key function of the run's result store.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    flow_name, flow_run_id = context.flow.name, context.flow_run.id
    context.result_store = context.result_store.model_copy(
        update={"storage_key_fn": lambda: result_key(flow_name, flow_run_id)}
    )
