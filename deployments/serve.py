"""`ue-pilot serve`: every deployment from one process, with a local Prefect
server when none is configured.

With PREFECT_API_URL unset (in the environment and the Prefect profile), it
starts `prefect server start` on 127.0.0.1 as a child process, whose SQLite
database lives under PREFECT_HOME, and stops it after `serve` returns.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx

from deployments import build_deployments

LOOPBACK = "127.0.0.1"
# Keep a server started here from sending anything off this machine. A browser
# that opens the React UI still loads an analytics script from an outside host,
# which only the browser can block.
LOCAL_SERVER_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
}


class PrefectServerStartError(RuntimeError):
    """The local Prefect server could not start or did not become healthy."""


class LocalPrefectServer:
    """A `prefect server start` child process on 127.0.0.1, owned by this process.

    `env` is added to this process's environment for the child, for example
    PREFECT_API_DATABASE_CONNECTION_URL to put its database on PostgreSQL.
    The child's output goes to `log` (a file path), or to this process's
    output when `log` is None.
    """

    def __init__(
        self,
        port: int,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.port = port
        self.api_url = f"http://{LOOPBACK}:{port}/api"
        self.log = log
        if not port_is_free(port):
            raise PrefectServerStartError(
                f"port {port} on {LOOPBACK} is in use: pass another --port, or set "
                "PREFECT_API_URL to the Prefect server that runs there"
            )
        # Imported here, not in the forked child: an import there can deadlock.
        from ue_pilot.sandbox.runner import stop_with_parent

        # Prefect 3.9.1's UI calls the API at PREFECT_SERVER_API_HOST and
        # PREFECT_SERVER_API_PORT (default 4200) unless PREFECT_SERVER_UI_API_URL
        # is set. `--port` changes neither, so both are set here.
        address = {"PREFECT_SERVER_API_HOST": LOOPBACK,
                   "PREFECT_SERVER_API_PORT": str(port)}
        child_env = os.environ | LOCAL_SERVER_ENV | address | (env or {})
        child_env.pop("PREFECT_API_URL", None)
        self._output: IO[bytes] | None = open(log, "wb") if log else None
        command = [
            sys.executable, "-m", "prefect", "server", "start",
            "--host", LOOPBACK, "--port", str(port),
        ]  # fmt: skip
        # A session of its own keeps Ctrl-C in a terminal away from the server,
        # so `serve` can pause its schedules before the server stops.
        self.process = subprocess.Popen(
            command,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT if self._output else None,
            start_new_session=True,
            preexec_fn=stop_with_parent,
        )
        try:
            self._wait_until_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_until_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise PrefectServerStartError(
                        f"prefect server start exited with status "
                        f"{self.process.returncode}{self._log_hint()}"
                    )
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
        raise PrefectServerStartError(
            f"the Prefect server on port {self.port} was not healthy after "
            f"{timeout:.0f} s{self._log_hint()}"
        )

    def _log_hint(self) -> str:
        return f"; see {self.log}" if self.log else ""

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server with SIGTERM, or SIGKILL after `timeout` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._output is not None:
            self._output.close()
            self._output = None

    def __enter__(self) -> LocalPrefectServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def port_is_free(port: int) -> bool:
    """Return whether a TCP server could bind `port` on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def configured_api_url() -> str | None:
    """Return PREFECT_API_URL from the environment or the active Prefect profile."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


@contextmanager
def prefect_api(port: int) -> Iterator[str]:
    """Yield the configured Prefect API, or that of a local server started here."""
    url = configured_api_url()
    if url:
        yield url
        return

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with LocalPrefectServer(port) as server:
        # Flow runs start in child processes, which read the URL from the environment.
        os.environ["PREFECT_API_URL"] = server.api_url
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url


def serve_all(port: int) -> int:
    """Serve every deployment until SIGINT or SIGTERM, and return how many."""
    from prefect import serve

    deployments = build_deployments()
    with prefect_api(port) as api_url:
        ui_url = api_url.removesuffix("/api") + "/v2"
        print(f"Prefect API {api_url}; UI {ui_url}", flush=True)
        serve(*deployments)
    return len(deployments)
