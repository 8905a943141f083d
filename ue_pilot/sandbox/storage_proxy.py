"""A loopback HTTP proxy in front of Azurite that makes every Copy Blob fail.

The sandbox's `blob-copy-fails` fault points UE_BLOB_CONNECTION_STRING at
this proxy. It forwards every request to Azurite unchanged, except a PUT with
an `x-ms-copy-source` header (Copy Blob, Copy Blob From URL, Put Blob From
URL). For those it returns 500 InternalError, as a storage account does when
a copy fails on its side. The SDK retries a 500 like any other server error,
UE_BLOB_RETRY_TOTAL times, before it raises.

Shared Key signatures cover the method, the path, the query and the x-ms-*
headers but not the Host header, so forwarded requests stay valid.
"""

from __future__ import annotations

import contextlib
import uuid
from email.utils import formatdate

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ue_pilot.sandbox.servers import LOOPBACK, RunningServer, start_server

# Headers that belong to one connection, not to the request or response.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
})
# httpx sets these on the forwarded request itself.
SET_BY_CLIENT = frozenset({"host", "content-length"})
METHODS = ["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"]


def is_copy_request(request: Request) -> bool:
    return request.method == "PUT" and "x-ms-copy-source" in request.headers


def copy_failed_response() -> Response:
    """Return the 500 InternalError a storage account sends, in its XML form."""
    request_id = str(uuid.uuid4())
    body = (
        '<?xml version="1.0" encoding="utf-8"?><Error><Code>InternalError</Code>'
        "<Message>The server encountered an internal error. Please retry the "
        f"request.\nRequestId:{request_id}\nTime:{formatdate(usegmt=True)}"
        "</Message></Error>"
    )
    return Response(
        body,
        status_code=500,
        media_type="application/xml",
        headers={"x-ms-error-code": "InternalError", "x-ms-request-id": request_id},
    )


def create_storage_proxy_app(upstream: str, fail_copies: bool = True) -> Starlette:
    """Build the proxy app that forwards to `upstream`, an http://127.0.0.1 URL."""
    state: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        # trust_env=False: proxy variables must not send Azurite's traffic away.
        async with httpx.AsyncClient(
            base_url=upstream, trust_env=False, timeout=60.0
        ) as client:
            state["client"] = client
            yield

    async def forward(request: Request) -> Response:
        if fail_copies and is_copy_request(request):
            return copy_failed_response()
        headers = [
            (name, value)
            for name, value in request.headers.items()
            if name.lower() not in HOP_BY_HOP | SET_BY_CLIENT
        ]
        # The raw path and query keep the client's percent-encoding of blob names.
        target = request.scope["raw_path"].decode("latin-1")
        if request.scope["query_string"]:
            target += "?" + request.scope["query_string"].decode("latin-1")
        outgoing = state["client"].build_request(
            request.method, target, headers=headers, content=await request.body()
        )
        upstream_response = await state["client"].send(outgoing, stream=True)
        response_headers = {
            name: value
            for name, value in upstream_response.headers.items()
            if name.lower() not in HOP_BY_HOP
        }
        return StreamingResponse(
            upstream_response.aiter_raw(),
            status_code=upstream_response.status_code,
            headers=response_headers,
            background=BackgroundTask(upstream_response.aclose),
        )

    routes = [Route("/{path:path}", forward, methods=METHODS)]
    return Starlette(routes=routes, lifespan=lifespan)


def start_storage_proxy(azurite_port: int, fail_copies: bool = True) -> RunningServer:
    """Start the proxy on a free port of 127.0.0.1 in front of Azurite's port."""
    upstream = f"http://{LOOPBACK}:{azurite_port}"
    return start_server(create_storage_proxy_app(upstream, fail_copies))
