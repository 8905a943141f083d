"""Bounded catch-up of the hourly audit after downtime: a backlog costs one audit.

Prefect 3.9.1's scheduler service creates each deployment's runs ahead of time
(by default at least 3 runs and at least an hour ahead). It schedules from the
current time on, so it never creates runs for slots that passed while the
server was down. Runs it created that no worker started stay Scheduled, and
the late-runs service renames them Late while the scheduler keeps adding runs
ahead. A worker that comes back then fetches every due run at once.

The audit deployment's concurrency limit of 1 with CANCEL_NEW cancels each run
that requests a slot while another run has it. That covers runs a worker
submits together, but not runs it submits in a later poll or after the first
run ended. Each of those would audit again. So the audit run that holds the
slot first cancels every other run of its deployment that is due and has not
started. It covers the missed hours itself, because its telemetry window
starts at the end of the last recorded window, up to
UE_WINDOW_MAX_LOOKBACK_MINUTES back.

Every other run that was due when the holder started therefore ends Cancelled
without auditing, cancelled by the concurrency limit or by the holder. The
exception is a holder whose calls to the Prefect API fail, which it logs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

import httpx
from prefect import get_run_logger, runtime
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.states import Cancelled

# The largest page the Prefect API returns (PREFECT_API_DEFAULT_LIMIT).
PAGE_SIZE = 200


def cancel_missed_runs(
    client: SyncPrefectClient, deployment_id: UUID, flow_run_id: UUID, now: datetime
) -> list[FlowRun]:
    """Cancel the deployment's runs due by `now` that have not started, and return them.

    `flow_run_id`, the run doing the catch-up, is left alone, and so are runs
    due later than `now`.
    """
    missed_filter = FlowRunFilter(
        id=FlowRunFilterId(not_any_=[flow_run_id]),
        deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
        state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
        ),
        expected_start_time=FlowRunFilterExpectedStartTime(before_=now),
    )
    message = (
        f"Skipped: flow run {flow_run_id} audits the window this run missed "
        "(catch-up after downtime)"
    )
    cancelled: list[FlowRun] = []
    while True:
        # A cancelled run leaves the filter, so each pass reads the first page again.
        page = client.read_flow_runs(
            flow_run_filter=missed_filter,
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=PAGE_SIZE,
        )
        done = [run for run in page if cancel_run(client, run, message)]
        cancelled += done
        if len(page) < PAGE_SIZE or not done:
            return cancelled


def cancel_run(client: SyncPrefectClient, run: FlowRun, message: str) -> bool:
    """Propose Cancelled for `run` and return whether the server accepted it."""
    result = client.set_flow_run_state(run.id, Cancelled(message=message))
    return result.state is not None and result.state.is_cancelled()


def supersede_missed_runs() -> int:
    """Cancel the due, unstarted runs of this run's deployment and return how many.

    Does nothing outside a deployment run. An API error is logged and the audit
    goes on: the concurrency limit still bounds the backlog.
    """
    deployment_id = runtime.deployment.id
    if not deployment_id:
        return 0
    logger = get_run_logger()
    flow_run_id = UUID(runtime.flow_run.id)
    try:
        with get_client(sync_client=True) as client:
            cancelled = cancel_missed_runs(
                client, UUID(deployment_id), flow_run_id, datetime.now(UTC)
            )
    except httpx.HTTPError as error:
        logger.warning(
            "missed runs of deployment %s not cancelled: %s",
            deployment_id,
            type(error).__name__,
        )
        return 0
    for run in cancelled:
        logger.info(
            "cancelled missed run %s (due %s) because this run audits its window",
            run.id,
            run.expected_start_time,
        )
    return len(cancelled)
