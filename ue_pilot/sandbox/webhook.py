"""A webhook receiver that records the notifications the rollback sends.

`POST /hooks/{token}` accepts a JSON object when `token` is the receiver's
secret, as chat and incident webhooks carry their secret in the URL, and
returns 404 for any other token. Two routes exist only in the sandbox and need
no token: `GET /sandbox/notifications` returns the accepted notifications in
order, each with its `received_at` time and `Idempotency-Key` header, and
`DELETE /sandbox/notifications` clears them.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["create_webhook_app"]

logger = logging.getLogger(__name__)


def create_webhook_app(token: str) -> Starlette:
    """Create the receiver whose webhook URL path is `/hooks/<token>`."""
    if not token:
        raise ValueError("token must not be empty")
    notifications: list[dict] = []

    async def receive(request: Request) -> Response:
        if not hmac.compare_digest(request.path_params["token"], token):
            return JSONResponse({"error": "unknown webhook"}, status_code=404)
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse(
                {"error": "the body must be a JSON object"}, status_code=400
            )
        notifications.append({
            "body": body,
            "idempotency_key": request.headers.get("idempotency-key"),
            "received_at": dt.datetime.now(dt.UTC).isoformat(),
        })
        logger.info("webhook notification accepted (%d so far)", len(notifications))
        return JSONResponse({"status": "accepted"}, status_code=202)

    async def list_notifications(request: Request) -> JSONResponse:
        return JSONResponse(notifications)

    async def clear_notifications(request: Request) -> Response:
        notifications.clear()
        return Response(status_code=204)

    return Starlette(routes=[
        Route("/hooks/{token}", receive, methods=["POST"]),
        Route("/sandbox/notifications", list_notifications, methods=["GET"]),
        Route("/sandbox/notifications", clear_notifications, methods=["DELETE"]),
    ])
