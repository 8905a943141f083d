"""Run ASGI apps under uvicorn on 127.0.0.1 in a background thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

LOOPBACK = "127.0.0.1"


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    """A uvicorn server serving one app from a daemon thread."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to exit and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout)


class RequestDelay:
    """ASGI wrapper that sleeps a fixed time before each HTTP request.

    The sleep stands for a network round trip to a cloud service, so that a
    client's concurrency shows even though every server runs on loopback.
    """

    def __init__(self, app, delay_ms: float) -> None:
        self.app = app
        self.delay = delay_ms / 1000

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.delay > 0:
            await asyncio.sleep(self.delay)
        await self.app(scope, receive, send)


def start_server(app, port: int = 0, startup_timeout: float = 15.0) -> RunningServer:
    """Start `app` on 127.0.0.1 (a free port when `port` is 0) and wait until it serves.

    Raises RuntimeError when the server does not start within `startup_timeout`
    seconds, for example because the port is taken.
    """
    port = port or find_free_port()
    config = uvicorn.Config(
        app,
        host=LOOPBACK,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve()),
        name=f"uvicorn-{port}",
        daemon=True,
    )
    thread.start()

    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(
                f"server on {LOOPBACK}:{port} did not start within "
                f"{startup_timeout:.0f} s; is the port taken?"
            )
        time.sleep(0.02)
    return RunningServer(url=f"http://{LOOPBACK}:{port}", server=server, thread=thread)
