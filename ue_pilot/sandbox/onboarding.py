"""What the sandbox adds for the onboarding flow: telemetry ingestion, probe
sessions for new orgs, an operator user, seed scripts and a seed role.

- Ingestion: a stand-in for the Application Insights ingestion endpoint,
  `POST /v2/track` and `POST /v2.1/track`, which takes a JSON array of
  telemetry envelopes as the Monitor.Exporters API in Azure/azure-rest-api-specs
  describes it and returns `{"itemsReceived", "itemsAccepted", "errors"}` with
  200, 206 (some items rejected) or 400 (none accepted). Only `EventData` items
  are stored, into the sandbox's TelemetryStore. Fault `telemetry-ingest-drops`
  accepts every valid item and stores none.
- Probe sessions: `POST /sandbox/probe-sessions` with `{"org_id", "roles"}`
  issues a session of each role in the UE application's session registry, for
  an org onboarding has just created. Real deployments have no such route:
  their operator lists the new org's sessions in UE_PROBE_SESSIONS.
- An operator user in the Clerk stand-in, the creator of onboarded orgs.
- The seed role is the application role itself, with CREATE on the database so
  that the flow can create its `ue_pilot.seed_log` table on first use.

Both servers bind to 127.0.0.1 and take no credentials beyond the
instrumentation key, like the Clerk stand-in's `/sandbox` routes.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ue_pilot.orgids import InvalidOrgIdError, validate_org_id
from ue_pilot.sandbox.app import ROLES, SessionRegistry
from ue_pilot.sandbox.servers import start_server
from ue_pilot.sandbox.telemetry import TelemetryStore

if TYPE_CHECKING:
    from ue_pilot.sandbox.runner import Sandbox

__all__ = [
    "SEEDS_DIR",
    "create_ingestion_app",
    "create_session_issuer_app",
    "start_onboarding_services",
]

logger = logging.getLogger(__name__)

SEEDS_DIR = Path(__file__).with_name("seeds")
# A seed script that writes a row of another org; row-level security rejects it.
CROSS_ORG_SEED = Path(__file__).with_name("seed_faults") / "050_cross_org_member.sql"
EVENT_BASE_TYPE = "EventData"
_GUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


def create_ingestion_app(
    store: TelemetryStore, instrumentation_key: str, *, drop: bool = False
) -> Starlette:
    """Create the ingestion stand-in that accepts items of `instrumentation_key`.

    With `drop` every valid item is acknowledged as accepted and not stored.
    """
    if not _GUID.match(instrumentation_key):
        raise ValueError(
            f"invalid instrumentation key {instrumentation_key!r}: expected a GUID"
        )

    async def track(request: Request) -> JSONResponse:
        try:
            items = await request.json()
        except ValueError:
            return _track_response(0, [{"index": 0, "statusCode": 400,
                                        "message": "the body is not valid JSON"}])
        items = items if isinstance(items, list) else [items]
        errors = []
        for index, item in enumerate(items):
            problem = _envelope_problem(item, instrumentation_key)
            if problem:
                errors.append({"index": index, "statusCode": 400, "message": problem})
            elif not drop:
                _store_event(store, item)
        if drop:
            logger.warning("fault telemetry-ingest-drops: %d item(s) not stored",
                           len(items) - len(errors))
        return _track_response(len(items), errors)

    routes = [
        Route("/v2/track", track, methods=["POST"]),
        Route("/v2.1/track", track, methods=["POST"]),
    ]
    return Starlette(routes=routes)


def _envelope_problem(item: Any, instrumentation_key: str) -> str:
    """Return why an envelope is rejected, or "" when it can be stored."""
    if not isinstance(item, dict):
        return "the item is not a JSON object"
    if str(item.get("iKey", "")).lower() != instrumentation_key.lower():
        return "invalid instrumentation key"
    data = item.get("data")
    if not isinstance(data, dict) or data.get("baseType") != EVENT_BASE_TYPE:
        # NOTE: requests, metrics, traces and the other item types are not stored.
        return "only EventData items are supported by the sandbox"
    base = data.get("baseData")
    if not isinstance(base, dict) or not isinstance(base.get("name"), str):
        return "Field 'name' on type 'EventData' is required"
    properties = base.get("properties") or {}
    if not isinstance(properties, dict):
        return "Field 'properties' on type 'EventData' must be an object"
    try:
        _parse_time(item.get("time"))
    except (TypeError, ValueError):
        return "Field 'time' on type 'Envelope' is not a valid date and time"
    return ""


def _store_event(store: TelemetryStore, item: dict) -> None:
    base = item["data"]["baseData"]
    properties = {str(k): str(v) for k, v in (base.get("properties") or {}).items()}
    store.track_event(base["name"], properties, timestamp=_parse_time(item.get("time")))


def _parse_time(value: object) -> dt.datetime:
    moment = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _track_response(received: int, errors: list[dict]) -> JSONResponse:
    accepted = received - len(errors)
    if not errors:
        status = 200
    elif accepted:
        status = 206
    else:
        status = 400
    body = {"itemsReceived": received, "itemsAccepted": accepted, "errors": errors}
    return JSONResponse(body, status_code=status)


def create_session_issuer_app(sessions: SessionRegistry) -> Starlette:
    """Create the route that issues probe sessions of a new org in `sessions`."""

    async def issue(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse({"error": "expected a JSON object"}, status_code=400)
        roles = body.get("roles") or list(ROLES)
        if not isinstance(roles, list) or any(role not in ROLES for role in roles):
            return JSONResponse(
                {"error": f"invalid roles {roles!r}; known roles: {list(ROLES)}"},
                status_code=400,
            )
        try:
            org_id = validate_org_id(body.get("org_id"))
        except InvalidOrgIdError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        issued = {role: sessions.issue(org_id, role) for role in roles}
        logger.info("issued %d probe session(s) for %s", len(issued), org_id)
        return JSONResponse({"org_id": org_id, "sessions": issued})

    return Starlette(routes=[Route("/sandbox/probe-sessions", issue, methods=["POST"])])


def grant_seed_role(sandbox: Sandbox) -> None:
    """Let the application role create the flow's seed log schema in the database."""
    database = sandbox.database
    with psycopg.connect(database.admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(database.name), sql.Identifier(database.app_role)
            )
        )


def create_operator(sandbox: Sandbox) -> str:
    """Create the Clerk user that onboarding records as the creator of new orgs."""
    user = sandbox.clerk.create_user({
        "email_address": ["pilot-operator@ue-sandbox.example"],
        "first_name": "Pilot",
        "last_name": "Operator",
    })
    return user["id"]


def start_onboarding_services(
    sandbox: Sandbox, sessions: SessionRegistry, faults: set[str]
) -> dict[str, str]:
    """Start the ingestion and session issuer servers; return their `UE_*` settings."""
    grant_seed_role(sandbox)
    instrumentation_key = str(uuid.uuid4())
    ingestion = start_server(create_ingestion_app(
        sandbox.telemetry, instrumentation_key,
        drop="telemetry-ingest-drops" in faults,
    ))
    sandbox.servers.append(ingestion)
    issuer = start_server(create_session_issuer_app(sessions))
    sandbox.servers.append(issuer)
    return {
        "UE_APPINSIGHTS_CONNECTION_STRING": (
            f"InstrumentationKey={instrumentation_key};"
            f"IngestionEndpoint={ingestion.url}/"
        ),
        "UE_PROBE_SESSION_ISSUER_URL": issuer.url + "/sandbox/probe-sessions",
        "UE_SEED_DATABASE_URL": sandbox.database.app_url,
        "UE_SEED_SCRIPTS_DIR": str(SEEDS_DIR),
        "UE_ONBOARDING_CREATED_BY": create_operator(sandbox),
    }
