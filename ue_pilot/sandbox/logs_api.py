"""A stand-in for the Azure Monitor Logs query API, as `LogsQueryClient` calls it.

azure-monitor-query 2.0.0 sends `POST {endpoint}/v1/workspaces/{id}/query` from
`query_workspace` and `POST {endpoint}/v1{resource_id}/query` from
`query_resource`, each with the JSON body `{"query", "timespan", "workspaces"}`
and an optional `Prefer` header. The app evaluates the query on a
`TelemetryStore` and returns the result in the Log Analytics response format.

Status codes and error bodies follow the documented API
(https://learn.microsoft.com/azure/azure-monitor/logs/api/errors): 401
`AuthenticationFailed` without a bearer token, 403 `InvalidAuthenticationToken`
for a wrong one, and 400 `BadArgumentError` with an `innererror` for invalid
KQL. A body-level `error` with code `PartialError` beside the tables makes the
client return `LogsQueryPartialResult`.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import time

import isodate
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ue_pilot.sandbox.telemetry import KqlQueryError, TelemetryStore

__all__ = ["create_logs_app", "parse_timespan"]

logger = logging.getLogger(__name__)


class _RequestRejected(Exception):
    """A request rejected with an Azure-style error body instead of a result."""

    def __init__(self, status: int, code: str, message: str, inner=None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.inner = inner

    def to_response(self) -> JSONResponse:
        error = {"code": self.code, "message": self.message}
        if self.inner:
            error["innererror"] = self.inner
        return JSONResponse({"error": error}, status_code=self.status)


def create_logs_app(
    store: TelemetryStore,
    *,
    token: str,
    workspace_id: str,
    resource_id: str,
    partial: bool = False,
) -> Starlette:
    """Create the Logs query API app for one workspace and one resource.

    Both scopes query the same `store`. Requests must carry
    `Authorization: Bearer <token>`. With `partial=True` every successful query
    returns only the first half of its rows and a body-level `PartialError`, so
    the client returns `LogsQueryPartialResult`. `GET /sandbox/stats` returns
    `{"queries": n}`, the number of authorized query requests to a known scope,
    including those rejected for invalid KQL.
    """
    service = _LogsQueryService(store, token, workspace_id, resource_id, partial)
    routes = [
        Route("/sandbox/stats", service.stats, methods=["GET"]),
        Route(
            "/v1/workspaces/{workspace_id}/query",
            service.query_workspace,
            methods=["POST"],
        ),
        Route(
            "/v1/{resource_path:path}/query",
            service.query_resource,
            methods=["POST"],
        ),
    ]
    return Starlette(routes=routes)


class _LogsQueryService:
    """The request handlers of one Logs API stand-in and its query count."""

    def __init__(
        self,
        store: TelemetryStore,
        token: str,
        workspace_id: str,
        resource_id: str,
        partial: bool,
    ) -> None:
        self.store = store
        self.token = token
        self.workspace_id = workspace_id
        # Azure resource ids are case-insensitive.
        self.resource_id = resource_id.rstrip("/").casefold()
        self.partial = partial
        self.queries = 0

    # NOTE: The service's error codes for an unknown workspace or resource were
    # not checked, so the 404 codes below are this stand-in's own.
    async def query_workspace(self, request: Request) -> JSONResponse:
        requested = request.path_params["workspace_id"]
        known = requested.casefold() == self.workspace_id.casefold()
        not_found = _RequestRejected(
            404,
            "WorkspaceNotFoundError",
            f"The workspace {requested!r} could not be found.",
        )
        return await self._handle_query(request, None if known else not_found)

    async def query_resource(self, request: Request) -> JSONResponse:
        requested = "/" + request.path_params["resource_path"].rstrip("/")
        known = requested.casefold() == self.resource_id
        not_found = _RequestRejected(
            404,
            "ResourceNotFoundError",
            f"The resource {requested!r} could not be found.",
        )
        return await self._handle_query(request, None if known else not_found)

    async def stats(self, request: Request) -> JSONResponse:
        return JSONResponse({"queries": self.queries})

    async def _handle_query(
        self, request: Request, not_found: _RequestRejected | None
    ) -> JSONResponse:
        """Check the token, then the scope, then evaluate the query in the body."""
        try:
            _check_token(request, self.token)
            if not_found is not None:
                raise not_found
            query, timespan = await _read_query_body(request)
            self.queries += 1
            body = await self._evaluate(request, query, timespan)
        except _RequestRejected as rejection:
            logger.info(
                "logs query rejected: path=%s status=%d code=%s message=%s",
                request.url.path,
                rejection.status,
                rejection.code,
                rejection.message,
            )
            return rejection.to_response()

        logger.info(
            "logs query succeeded: path=%s rows=%d partial=%s",
            request.url.path,
            len(body["tables"][0]["rows"]),
            self.partial,
        )
        return JSONResponse(body)

    async def _evaluate(self, request: Request, query: str, timespan: tuple) -> dict:
        """Evaluate the query off the event loop and build the 200 response body."""
        # NOTE: The `wait=` preference (server_timeout) is not enforced, because
        # every sandbox query finishes in well under a second.
        started = time.perf_counter()
        start, end = timespan
        try:
            columns, rows = await run_in_threadpool(self.store.query, query, start, end)
        except KqlQueryError as error:
            raise _bad_argument(error.code, error.message) from error

        if self.partial:
            body = _partial_body(columns, rows)
        else:
            body = {"tables": [_primary_table(columns, rows)]}
        if "include-statistics=true" in request.headers.get("prefer", ""):
            elapsed = time.perf_counter() - started
            body["statistics"] = {"query": {"executionTime": elapsed}}
        return body


def parse_timespan(
    text: str | None, now: dt.datetime | None = None
) -> tuple[dt.datetime | None, dt.datetime | None]:
    """Parse an ISO 8601 interval into (start, end) in UTC.

    Accepts `start/end`, `start/duration`, `duration/end`, and a bare duration
    that ends at `now` (the current time when None). None or an empty string
    returns (None, None), which means all rows. Raises ValueError otherwise.
    """
    if not text:
        return None, None
    now = now or dt.datetime.now(dt.UTC)
    parts = text.split("/")
    if len(parts) == 1:
        return now - isodate.parse_duration(parts[0]), now
    if len(parts) != 2:
        raise ValueError(f"invalid timespan {text!r}: expected one '/' at most")

    first, second = parts
    if first.startswith("P"):
        end = _parse_instant(second)
        return end - isodate.parse_duration(first), end
    start = _parse_instant(first)
    if second.startswith("P"):
        return start, start + isodate.parse_duration(second)
    return start, _parse_instant(second)


def _parse_instant(text: str) -> dt.datetime:
    """Parse an ISO 8601 date and time, taking a value without an offset as UTC."""
    instant = isodate.parse_datetime(text)
    if instant.tzinfo is None:
        return instant.replace(tzinfo=dt.UTC)
    return instant.astimezone(dt.UTC)


def _check_token(request: Request, token: str) -> None:
    """Raise _RequestRejected unless the request carries the expected bearer token."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise _RequestRejected(
            401,
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is missing.",
        )
    if not hmac.compare_digest(credentials.strip().encode(), token.encode()):
        raise _RequestRejected(
            403, "InvalidAuthenticationToken", "The access token is invalid."
        )


async def _read_query_body(request: Request) -> tuple[str, tuple]:
    """Return the query text and the parsed timespan of a query request body."""
    try:
        body = await request.json()
    except ValueError as error:
        message = "The request body is not valid JSON."
        raise _bad_argument("InvalidJson", message) from error
    if not isinstance(body, dict) or not isinstance(body.get("query"), str):
        raise _bad_argument(
            "MissingQuery", "The request body must be an object with a 'query' string."
        )

    # NOTE: One store serves every scope, so the stand-in rejects cross-workspace
    # queries, where the service would union the named workspaces' tables.
    if body.get("workspaces"):
        raise _bad_argument(
            "UnsupportedArgument",
            "Additional workspaces are not supported by the sandbox stand-in.",
        )
    timespan = body.get("timespan")
    if timespan is not None and not isinstance(timespan, str):
        message = f"The timespan {timespan!r} is not an ISO 8601 interval string."
        raise _bad_argument("InvalidTimespan", message)
    try:
        bounds = parse_timespan(timespan)
    except (ValueError, OverflowError) as error:
        message = f"The timespan {timespan!r} is invalid: {error}"
        raise _bad_argument("InvalidTimespan", message) from error
    return body["query"], bounds


def _partial_body(columns: list[dict], rows: list[list]) -> dict:
    """Build a body with the first half of the rows and a `PartialError`."""
    returned_rows = rows[: len(rows) // 2]
    return {
        "tables": [_primary_table(columns, returned_rows)],
        "error": {
            "code": "PartialError",
            "message": "There were some errors when processing your query.",
            "details": [
                {
                    "code": "ResultTruncated",
                    "message": (
                        f"The sandbox returned {len(returned_rows)} of "
                        f"{len(rows)} rows because partial results are switched on."
                    ),
                }
            ],
        },
    }


def _primary_table(columns: list[dict], rows: list[list]) -> dict:
    return {"name": "PrimaryResult", "columns": columns, "rows": rows}


def _bad_argument(inner_code: str, inner_message: str) -> _RequestRejected:
    """Build the 400 `BadArgumentError` that the service returns for a bad request."""
    return _RequestRejected(
        400,
        "BadArgumentError",
        "The request had some invalid properties",
        inner={"code": inner_code, "message": inner_message},
    )
