"""`ue-pilot serve`: a local Prefect server on SQLite, every deployment served
from one process, and both stopped by Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deployments import DEPLOYMENTS
from deployments.serve import LocalPrefectServer, PrefectServerStartError, port_is_free
from ue_pilot.sandbox.servers import find_free_port

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 240.0


def start_serve(port: int, home: Path) -> subprocess.Popen:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("UE_", "PREFECT_"))}
    env |= {
        "PREFECT_HOME": str(home),
        "UE_SCHEDULE_TIMEZONE": "America/Toronto",
        "UE_RESULT_STORAGE_PATH": str(home / "results"),
    }
    with open(home / "serve.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "ue_pilot.cli", "serve", "--port", str(port)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT,
            # A shell starts background jobs with SIGINT ignored, hiding Ctrl-C.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def read_deployments(api_url: str, count: int) -> dict[str, dict]:
    """Poll the API until `count` deployments exist; return them by full name."""
    deadline = time.monotonic() + START_TIMEOUT
    with httpx.Client(base_url=api_url, trust_env=False, timeout=10) as client:
        while time.monotonic() < deadline:
            try:
                deployments = client.post("/deployments/filter", json={}).json()
            except httpx.TransportError:
                deployments = []
            if len(deployments) >= count:
                flows = {d["flow_id"]: client.get(f"/flows/{d['flow_id']}").json()
                         for d in deployments}
                return {f"{flows[d['flow_id']]['name']}/{d['name']}": d
                        for d in deployments}
            time.sleep(1)
    pytest.fail(f"{count} deployments did not appear within {START_TIMEOUT:.0f} s")


def child_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM],
                         ids=["ctrl-c", "sigterm"])
def test_serve_starts_server_and_serves_all(tmp_path, stop_signal):
    """serve starts a local server, serves every deployment, and stops both."""
    port = find_free_port()
    process = start_serve(port, tmp_path)
    try:
        served = read_deployments(f"http://127.0.0.1:{port}/api", len(DEPLOYMENTS))
        (server_pid,) = child_pids(process.pid)
        process.send_signal(stop_signal)
        exit_code = process.wait(120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = (tmp_path / "serve.log").read_text(errors="replace")

    assert sorted(served) == sorted(s.full_name for s in DEPLOYMENTS)
    audit = served["isolation-audit/hourly"]
    assert audit["schedules"][0]["schedule"]["cron"] == "0 * * * *"
    assert audit["schedules"][0]["schedule"]["timezone"] == "America/Toronto"
    assert audit["global_concurrency_limit"]["limit"] == 1
    assert audit["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert exit_code == 0, output[-2000:]
    assert not is_running(server_pid)
    assert port_is_free(port)


def test_local_server_rejects_busy_port(tmp_path):
    """A port already in use is reported with the fix, before any process starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(PrefectServerStartError, match=f"port {port}.*--port"):
            LocalPrefectServer(port, log=tmp_path / "server.log")
    assert not (tmp_path / "server.log").exists()
