"""Run the blob service of Azurite, Microsoft's Azure Storage emulator, on 127.0.0.1.

The sandbox and the tests store exports and evidence in it through the same
azure-storage-blob client that production points at Azure. Azurite comes from
npm: run `npm ci` in the repository root to install the version that
package-lock.json pins.

NOTE: Azurite 3.37.0 declares Node 22 or newer in its package.json, but these
tests pass with it on Node 20.20.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import IO, Self

from ue_pilot.sandbox.servers import LOOPBACK, find_free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
AZURITE_BLOB = REPO_ROOT / "node_modules" / ".bin" / "azurite-blob"

# Azurite's built-in development account. Microsoft publishes this key in the
# Azurite README and the Azure Storage docs, so it protects nothing.
ACCOUNT_NAME = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr"
    "/KBHBeksoGMGw=="
)

# Azurite reads these at start. AZURITE_DB moves its metadata into a SQL server
# elsewhere and AZURITE_ACCOUNTS replaces the development account, so an
# inherited value would send data off this machine or break the connection
# string.
IGNORED_ENVIRONMENT = ("AZURITE_DB", "AZURITE_ACCOUNTS")


class AzuriteStartError(RuntimeError):
    """Azurite is not installed, exited early, or did not respond in time."""


class Azurite:
    """A running Azurite blob service, owned by this process.

    Use `Azurite.start()`, and `stop()` or a `with` block to end it. A child
    still running when the interpreter exits is stopped then as well. Where
    util-linux's setpriv exists, Linux also sends it SIGTERM when the thread
    that started it dies, even by SIGKILL.
    """

    def __init__(
        self,
        process: subprocess.Popen,
        port: int,
        location: Path,
        output: IO[bytes],
        temporary: bool,
    ) -> None:
        self.process = process
        self.port = port
        self.location = location
        self._output = output
        self._temporary_location = location if temporary else None
        self._finalizer = weakref.finalize(
            self, _terminate, process, output, self._temporary_location
        )

    @classmethod
    def start(
        cls,
        location: Path | None = None,
        port: int = 0,
        *,
        timeout: float = 30.0,
        binary: Path = AZURITE_BLOB,
    ) -> Self:
        """Start Azurite's blob service and wait until it responds to HTTP.

        `location` is the data directory. When it is None, a temporary one is
        created and `stop()` deletes it. `port` 0 picks a free port. Raises
        AzuriteStartError when `binary` is missing, the port is in use, or
        Azurite exits or does not respond within `timeout` seconds.
        """
        if not binary.exists():
            raise AzuriteStartError(
                f"Azurite is not installed: {binary} not found. Run "
                f"`npm ci` in {REPO_ROOT}."
            )
        # A second Azurite on a taken port exits, but the program already on
        # the port could respond to the readiness probe in its place.
        port = port or find_free_port()
        if not is_port_free(port):
            raise AzuriteStartError(
                f"port {port} on {LOOPBACK} is in use. Pass another port, "
                "or 0 for a free one."
            )
        temporary = location is None
        if location is None:
            location = Path(tempfile.mkdtemp(prefix="ue-azurite-"))
        location.mkdir(parents=True, exist_ok=True)

        # The Azurite object owns the file from here on and closes it in stop().
        output = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            process = subprocess.Popen(
                build_command(binary, location, port),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=build_environment(),
            )
        except OSError:
            output.close()
            if temporary:
                shutil.rmtree(location, ignore_errors=True)
            raise
        azurite = cls(process, port, location, output, temporary)
        try:
            azurite._wait_until_ready(timeout)
        except BaseException:
            azurite.stop()
            raise
        return azurite

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def account_url(self) -> str:
        """The blob endpoint of the development account, path-style."""
        return f"http://{LOOPBACK}:{self.port}/{ACCOUNT_NAME}"

    @property
    def connection_string(self) -> str:
        """A connection string for the development account at this port."""
        return (
            "DefaultEndpointsProtocol=http;"
            f"AccountName={ACCOUNT_NAME};"
            f"AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.account_url};"
        )

    def output_tail(self, limit: int = 4000) -> str:
        """Return the last `limit` characters Azurite wrote to stdout and stderr."""
        if self._output.closed:
            return ""
        self._output.flush()
        self._output.seek(0)
        return self._output.read().decode(errors="replace")[-limit:]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Azurite with SIGTERM, then SIGKILL after `timeout` seconds.

        Deletes the data directory when `start()` created it. Calling it again
        does nothing.
        """
        if self._finalizer.detach() is not None:
            _terminate(self.process, self._output, self._temporary_location, timeout)

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._is_serving():
            if self.process.poll() is not None:
                raise AzuriteStartError(
                    f"Azurite exited with code {self.process.returncode} "
                    f"before it responded on port {self.port}:\n{self.output_tail()}"
                )
            if time.monotonic() > deadline:
                raise AzuriteStartError(
                    f"Azurite timed out: no response on port {self.port} within "
                    f"{timeout:.0f} s:\n{self.output_tail()}"
                )
            time.sleep(0.05)

    def _is_serving(self) -> bool:
        """Check that an Azurite blob service responds to HTTP on the port.

        The Server header rules out another program that took the port between
        the free-port check and Azurite's start.
        """
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=1)
        try:
            connection.request("GET", f"/{ACCOUNT_NAME}?comp=properties")
            server = connection.getresponse().getheader("Server", "")
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()
        return server.startswith("Azurite-Blob")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def build_command(binary: Path, location: Path, port: int) -> list[str]:
    """Build the azurite-blob command line.

    `--skipApiVersionCheck` lets current SDKs through: azure-storage-blob
    12.31.1 sends `x-ms-version: 2026-10-06`, and Azurite 3.37.0 rejects any
    version newer than 2026-06-06 without it. `--loose` ignores headers Azurite
    does not implement instead of rejecting the request. `--disableTelemetry`
    stops Azurite from sending usage data to Microsoft.
    """
    return parent_death_prefix() + [
        str(binary),
        "--blobHost",
        LOOPBACK,
        "--blobPort",
        str(port),
        "--location",
        str(location),
        "--skipApiVersionCheck",
        "--loose",
        "--disableTelemetry",
        "--silent",
    ]


def is_port_free(port: int) -> bool:
    """Check that nothing listens on `port` of 127.0.0.1.

    SO_REUSEADDR, which Node also sets, lets the bind succeed over connections
    still in TIME_WAIT from an Azurite stopped a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def build_environment() -> dict[str, str]:
    environment = dict(os.environ)
    for name in IGNORED_ENVIRONMENT:
        environment.pop(name, None)
    return environment


def parent_death_prefix() -> list[str]:
    """Return `setpriv --pdeathsig TERM --` when setpriv is installed, else [].

    setpriv (util-linux, Linux only) sets Azurite's parent-death signal, so the
    kernel sends SIGTERM to Azurite when the thread that called Popen exits and
    a killed parent leaves no Azurite behind. The signal follows that thread,
    not the whole process, so a worker thread that starts Azurite and then ends
    takes Azurite with it. setpriv execs the command, so the child's PID stays
    Azurite's.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"]


def _terminate(
    process: subprocess.Popen,
    output: IO[bytes],
    temporary_location: Path | None,
    timeout: float = 10.0,
) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    output.close()
    if temporary_location is not None:
        shutil.rmtree(temporary_location, ignore_errors=True)
