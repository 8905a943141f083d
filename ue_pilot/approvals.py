"""Resuming a flow run that paused for input from code, as the Prefect UI's
Resume form does.

The CLI and the tests create a flow run, execute it in this process, and let a
`PauseResponder` thread resume it through the Prefect API with the same input
the form would send. The flow validates that input exactly as it validates
the form's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import ObjectNotFound
from prefect.flow_engine import run_flow
from prefect.flow_runs import resume_flow_run
from prefect.states import State

POLL_SECONDS = 0.5


def create_flow_run(flow: Flow, parameters: dict[str, Any]) -> FlowRun:
    """Create a pending run of `flow`, so its id is known before it starts."""
    with get_client(sync_client=True) as client:
        return client.create_flow_run(flow, parameters=parameters)


def execute_flow_run(
    flow: Flow, flow_run: FlowRun, parameters: dict[str, Any]
) -> State:
    """Run a created flow run in this thread and return its final state."""
    return run_flow(flow, flow_run=flow_run, parameters=parameters, return_type="state")


class PauseResponder(threading.Thread):
    """A thread that resumes the first pause of one flow run with `run_input`.

    When the run pauses for input, the thread reads the markdown artifact
    `artifact_key` of the run, passes it to `on_pause`, and resumes the run.
    It stops without resuming when the run ends first or when `stop` is
    called. `outcome` then describes which of these happened.
    """

    def __init__(
        self,
        flow_run_id: UUID,
        run_input: dict[str, Any],
        artifact_key: str,
        on_pause: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name=f"pause-responder-{flow_run_id}", daemon=True)
        self.flow_run_id = flow_run_id
        self.run_input = run_input
        self.artifact_key = artifact_key
        self.on_pause = on_pause
        self.outcome = "waiting"
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        try:
            with get_client(sync_client=True) as client:
                while not self._stopping.wait(POLL_SECONDS):
                    state = client.read_flow_run(self.flow_run_id).state
                    if state is not None and state.is_final():
                        self.outcome = f"ended {state.name} without pausing"
                        return
                    if state is not None and self._ready_for_input(client, state):
                        self._resume(client)
                        return
                self.outcome = "stopped"
        except Exception as error:  # reported to the caller through `outcome`
            self.outcome = f"failed: {type(error).__name__}: {error}"

    def _ready_for_input(self, client, state: State) -> bool:
        """Return True once the run is paused and its input form is saved.

        The flow saves the form's schema just after it pauses, and a resume
        before that is rejected.
        """
        if not state.is_paused():
            return False
        keyset = state.state_details.run_input_keyset
        if not keyset:
            return False
        try:
            client.read_flow_run_input(self.flow_run_id, keyset["schema"])
        except ObjectNotFound:
            return False
        return True

    def _resume(self, client) -> None:
        if self.on_pause is not None:
            self.on_pause(self._read_artifact(client))
        resume_flow_run(self.flow_run_id, run_input=self.run_input)
        self.outcome = "resumed"

    def _read_artifact(self, client) -> str:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[self.artifact_key]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[self.flow_run_id]),
            )
        )
        return str(artifacts[-1].data) if artifacts else ""
