"""The production path: a Prefect server on PostgreSQL, the process work pool,
`prefect deploy --all` from prefect.yaml, and a worker that runs the audit.

One server (on a throwaway PostgreSQL database), one sandbox and one worker
serve the whole module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import httpx
import psycopg
import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Scheduled
from psycopg import sql

from deployments import DEPLOYMENTS
from deployments.serve import LocalPrefectServer
from ue_pilot.sandbox.runner import SandboxProcess
from ue_pilot.sandbox.servers import find_free_port

pytestmark = pytest.mark.timeout(1200)

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get(
    "UE_SANDBOX_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
RUN_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def prefect_database() -> Iterator[str]:
    """A throwaway PostgreSQL database for the Prefect server, dropped afterwards."""
    name = f"ue_prefect_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    admin = psycopg.conninfo.conninfo_to_dict(ADMIN_URL)
    host, port = admin.get("host", "127.0.0.1"), admin.get("port", 5432)
    user = admin.get("user", "postgres")
    try:
        yield f"postgresql+asyncpg://{user}@{host}:{port}/{name}"
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )


@pytest.fixture(scope="module")
def prefect_env(prefect_database, tmp_path_factory) -> Iterator[dict[str, str]]:
    """Start the server on PostgreSQL and yield the Prefect settings that reach it."""
    home = tmp_path_factory.mktemp("prefect-home")
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    server_env = env | {"PREFECT_API_DATABASE_CONNECTION_URL": prefect_database}
    server = LocalPrefectServer(
        find_free_port(), env=server_env, log=home / "server.log", timeout=240
    )
    try:
        yield env | {"PREFECT_API_URL": server.api_url}
    finally:
        server.stop()


def prefect_cli(args: list[str], env: dict[str, str]) -> str:
    """Run the prefect CLI from the checkout and return its output."""
    completed = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        cwd=ROOT, env=os.environ | env, capture_output=True, text=True, timeout=300,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def deployed(prefect_env) -> dict[str, dict]:
    """Create the work pool, run `prefect deploy --all`, return the deployments."""
    prefect_cli(["work-pool", "create", "ue-pilot", "--type", "process"], prefect_env)
    prefect_cli(
        ["deploy", "--all"],
        prefect_env | {"UE_SCHEDULE_TIMEZONE": "America/Toronto"},
    )
    response = httpx.post(
        f"{prefect_env['PREFECT_API_URL']}/deployments/filter", json={},
        trust_env=False, timeout=30,
    )
    response.raise_for_status()
    by_flow = {}
    for deployment in response.json():
        flow = httpx.get(
            f"{prefect_env['PREFECT_API_URL']}/flows/{deployment['flow_id']}",
            trust_env=False, timeout=30,
        ).json()
        by_flow[f"{flow['name']}/{deployment['name']}"] = deployment
    return by_flow


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxProcess]:
    with SandboxProcess(orgs=2) as process:
        yield process


@pytest.fixture(scope="module")
def worker(deployed, prefect_env, sandbox, tmp_path_factory) -> Iterator[dict]:
    """Start `prefect worker start` with the sandbox's UE_ settings."""
    folder = tmp_path_factory.mktemp("worker")
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("UE_")}
    env |= prefect_env | sandbox.env | {
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "UE_RESULT_STORAGE_PATH": str(folder / "results"),
    }
    log = open(folder / "worker.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "ue-pilot",
         "--type", "process"],
        cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield {"pid": process.pid, "results": folder / "results", "log": folder}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def client(prefect_env) -> Iterator[SyncPrefectClient]:
    with temporary_settings({PREFECT_API_URL: prefect_env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as prefect_client:
            yield prefect_client


def create_run(client: SyncPrefectClient, deployment: dict, due: datetime) -> UUID:
    state = Scheduled(scheduled_time=due)
    return client.create_flow_run_from_deployment(deployment["id"], state=state).id


def wait_until_final(
    client: SyncPrefectClient, run_ids: list[UUID], worker: dict
) -> list[FlowRun]:
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        runs = [client.read_flow_run(run_id) for run_id in run_ids]
        if all(run.state.is_final() for run in runs):
            return runs
        time.sleep(1)
    log = (worker["log"] / "worker.log").read_text(errors="replace")[-3000:]
    pytest.fail(f"runs not final after {RUN_TIMEOUT:.0f} s. Worker log:\n{log}")


def pagerduty_events(sandbox: SandboxProcess) -> list[dict]:
    enqueue_url = sandbox.env["UE_PAGERDUTY_EVENTS_URL"]
    url = enqueue_url.replace("/v2/enqueue", "/sandbox/events")
    return httpx.get(url, trust_env=False, timeout=10).json()


def test_prefect_deploy_creates_deployments(deployed):
    """`prefect deploy --all` creates the deployment of every flow."""
    assert sorted(deployed) == sorted(spec.full_name for spec in DEPLOYMENTS)


def test_deployed_audit_schedule(deployed):
    """The deployed audit runs hourly in UE_SCHEDULE_TIMEZONE, one run at a time."""
    audit = deployed["isolation-audit/hourly"]
    (schedule,) = audit["schedules"]
    assert schedule["schedule"]["cron"] == "0 * * * *"
    assert schedule["schedule"]["timezone"] == "America/Toronto"
    assert audit["global_concurrency_limit"]["limit"] == 1
    assert audit["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert audit["work_pool_name"] == "ue-pilot"


def test_deployed_runs_from_checkout(deployed):
    """Worker runs start in the checkout that `prefect deploy` ran in."""
    for deployment in deployed.values():
        (step,) = deployment["pull_steps"]
        directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
        assert Path(directory) == ROOT


def test_deployed_parameters_have_descriptions(deployed):
    """Every deployed parameter carries a description for the UI's run form."""
    for name, deployment in deployed.items():
        properties = deployment["parameter_openapi_schema"]["properties"]
        for parameter, schema in properties.items():
            assert schema.get("description"), f"{name}: {parameter}"


def test_worker_runs_audit(client, deployed, worker):
    """A worker runs the audit deployment on the sandbox, and the verdict is pass."""
    run_id = create_run(client, deployed["isolation-audit/hourly"], datetime.now(UTC))
    (run,) = wait_until_final(client, [run_id], worker)
    assert run.state.is_completed(), run.state.message
    assert run.state.result()["verdict"] == "pass"
    stored = worker["results"] / "isolation-audit" / str(run_id) / "result.json"
    assert stored.exists()


def test_worker_runs_one_audit_for_backlog(client, deployed, worker):
    """Of three late runs, one audits and the other two end Cancelled.

    Which of the two bounds cancels a run depends on timing: the concurrency
    limit when the worker submits runs together, the audit's catch-up when
    it submits them later (tests/test_deployments.py tests that one alone).
    """
    now = datetime.now(UTC)
    audit = deployed["isolation-audit/hourly"]
    run_ids = [create_run(client, audit, now - timedelta(hours=h)) for h in (3, 2, 1)]
    runs = wait_until_final(client, run_ids, worker)
    completed = [run for run in runs if run.state.is_completed()]
    cancelled = [run for run in runs if run.state.is_cancelled()]
    assert len(completed) == 1
    assert len(cancelled) == 2
    by_catch_up = f"Skipped: flow run {completed[0].id} audits the window"
    by_limit = "Deployment concurrency limit reached."
    for run in cancelled:
        assert run.state.message.startswith((by_catch_up, by_limit))


def test_worker_pages_crashed_run(client, deployed, worker, sandbox):
    """An audit whose process is killed pages once, under its deployment's name."""
    run_id = create_run(client, deployed["isolation-audit/hourly"], datetime.now(UTC))
    pid = wait_for_flow_process(client, run_id, worker)
    os.kill(pid, signal.SIGKILL)
    (run,) = wait_until_final(client, [run_id], worker)
    assert run.state.is_crashed()
    key = "ue-pilot/isolation-audit/hourly/flow.crashed"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        crash_events = [e for e in pagerduty_events(sandbox) if e["dedup_key"] == key]
        if crash_events:
            break
        time.sleep(1)
    time.sleep(3)  # a second event would arrive by now
    crash_events = [e for e in pagerduty_events(sandbox) if e["dedup_key"] == key]
    assert len(crash_events) == 1
    assert crash_events[0]["payload"]["severity"] == "error"


def wait_for_flow_process(client: SyncPrefectClient, run_id: UUID, worker: dict) -> int:
    """Return the PID of the run's process once the run is Running.

    Before that the process may still be preparing its workspace, and a crash
    there cannot run the flow's hooks (Prefect 3.9.1 loads them from the
    workspace's manifest).
    """
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state.is_running() and run.infrastructure_pid:
            pid = int(str(run.infrastructure_pid).rpartition(":")[2])
            # Only a process this test's worker started may be killed.
            assert parent_pid(pid) == worker["pid"]
            return pid
        time.sleep(0.2)
    pytest.fail(f"flow run {run_id} was not Running within {RUN_TIMEOUT:.0f} s")


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])
