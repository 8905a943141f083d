"""A stand-in for the PagerDuty Events API v2 that records the events it accepts.

`POST /v2/enqueue` checks an event against the rules in PagerDuty's Events API
v2 documentation (github.com/PagerDuty/developer-docs,
docs/events-API-v2/02-Trigger-Events.md). The routing key must be the known one
and `event_action` one of trigger, acknowledge or resolve. A `dedup_key` has at
most 255 characters, and acknowledge and resolve require one. A trigger needs a
payload with `summary` (at most 1024 characters), `source` and `severity`. An
accepted event gets 202 `{"status": "success", "message": "Event processed",
"dedup_key"}`, and an invalid one gets 400 `{"status": "invalid event",
"message", "errors"}`.

Three routes exist only in the sandbox: `GET /sandbox/events` returns the
accepted events, `DELETE /sandbox/events` clears them and the incidents, and
`GET /sandbox/incidents` returns the incident state of each dedup key.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["create_pagerduty_app", "validate_event"]

logger = logging.getLogger(__name__)

EVENT_ACTIONS = ("trigger", "acknowledge", "resolve")
SEVERITIES = ("critical", "error", "warning", "info")
MAX_DEDUP_KEY_LENGTH = 255
MAX_SUMMARY_LENGTH = 1024
STATUS_AFTER_ACTION = {"acknowledge": "acknowledged", "resolve": "resolved"}


def create_pagerduty_app(routing_key: str) -> Starlette:
    """Create the Events API v2 app that accepts events for `routing_key` only."""
    service = _EventsService(routing_key)
    routes = [
        Route("/v2/enqueue", service.enqueue, methods=["POST"]),
        Route("/sandbox/events", service.list_events, methods=["GET"]),
        Route("/sandbox/events", service.clear_events, methods=["DELETE"]),
        Route("/sandbox/incidents", service.list_incidents, methods=["GET"]),
    ]
    return Starlette(routes=routes)


def validate_event(event: object, routing_key: str) -> list[str]:
    """Return the reasons `event` is invalid, an empty list when it is valid."""
    if not isinstance(event, dict):
        return ["the event must be a JSON object"]

    errors = []
    if event.get("routing_key") != routing_key:
        errors.append("'routing_key' is missing or does not match an integration")

    action = event.get("event_action")
    if action not in EVENT_ACTIONS:
        errors.append(
            f"'event_action' {action!r} is invalid; use one of "
            f"{', '.join(EVENT_ACTIONS)}"
        )

    errors.extend(_dedup_key_errors(event.get("dedup_key"), action))
    if action == "trigger":
        errors.extend(_payload_errors(event.get("payload")))
    return errors


def _dedup_key_errors(dedup_key: object, action: object) -> list[str]:
    if dedup_key is None:
        if action in ("acknowledge", "resolve"):
            return [f"'dedup_key' is required for event_action {action!r}"]
        return []
    if not isinstance(dedup_key, str) or not dedup_key:
        return ["'dedup_key' must be a non-empty string"]
    if len(dedup_key) > MAX_DEDUP_KEY_LENGTH:
        return [
            f"'dedup_key' is {len(dedup_key)} characters long; the maximum is "
            f"{MAX_DEDUP_KEY_LENGTH}"
        ]
    return []


def _payload_errors(payload: object) -> list[str]:
    if not isinstance(payload, dict):
        return ["'payload' is missing or is not an object"]

    errors = []
    summary = payload.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        errors.append("'payload.summary' is missing or blank")
    elif len(summary) > MAX_SUMMARY_LENGTH:
        errors.append(
            f"'payload.summary' is {len(summary)} characters long; the maximum is "
            f"{MAX_SUMMARY_LENGTH}"
        )

    source = payload.get("source")
    if not isinstance(source, str) or not source.strip():
        errors.append("'payload.source' is missing or blank")

    severity = payload.get("severity")
    if severity not in SEVERITIES:
        errors.append(
            f"'payload.severity' {severity!r} is invalid; use one of "
            f"{', '.join(SEVERITIES)}"
        )
    return errors


class _EventsService:
    """Accepted events and incident state of one routing key, in memory.

    Handlers run on the server's event loop and never await while changing the
    state, so no lock is needed.
    """

    def __init__(self, routing_key: str) -> None:
        self.routing_key = routing_key
        self.events: list[dict] = []
        self.incidents: dict[str, dict] = {}

    async def enqueue(self, request: Request) -> JSONResponse:
        try:
            event = await request.json()
        except ValueError:
            event = None
            errors = ["the request body is not valid JSON"]
        else:
            errors = validate_event(event, self.routing_key)
        if errors:
            logger.info("pagerduty event rejected: errors=%s", errors)
            return JSONResponse(
                {
                    "status": "invalid event",
                    "message": "Event object is invalid",
                    "errors": errors,
                },
                status_code=400,
            )

        dedup_key = event.get("dedup_key") or uuid.uuid4().hex
        self._record(event, dedup_key)
        logger.info(
            "pagerduty event accepted: action=%s dedup_key=%s",
            event["event_action"],
            dedup_key,
        )
        return JSONResponse(
            {"status": "success", "message": "Event processed", "dedup_key": dedup_key},
            status_code=202,
        )

    async def list_events(self, request: Request) -> JSONResponse:
        return JSONResponse(self.events)

    async def clear_events(self, request: Request) -> Response:
        self.events.clear()
        self.incidents.clear()
        return Response(status_code=204)

    async def list_incidents(self, request: Request) -> JSONResponse:
        return JSONResponse(self.incidents)

    def _record(self, event: dict, dedup_key: str) -> None:
        """Store the event without its routing key and update its incident."""
        stored = {key: value for key, value in event.items() if key != "routing_key"}
        stored["dedup_key"] = dedup_key
        stored["received_at"] = dt.datetime.now(dt.UTC).isoformat()
        self.events.append(stored)

        action = event["event_action"]
        incident = self.incidents.get(dedup_key)
        if action == "trigger":
            self._trigger(incident, event["payload"], dedup_key)
        elif incident is not None and incident["status"] != "resolved":
            # PagerDuty drops acknowledge and resolve events for an unknown or
            # resolved alert but still returns 202.
            incident["status"] = STATUS_AFTER_ACTION[action]

    def _trigger(self, incident: dict | None, payload: dict, dedup_key: str) -> None:
        """Open an incident, or count a trigger deduplicated into an open one.

        A trigger for a resolved dedup key opens a new incident, as PagerDuty
        does, and `triggers` keeps counting across both.
        """
        if incident is not None and incident["status"] != "resolved":
            incident["triggers"] += 1
            return
        triggers = incident["triggers"] + 1 if incident is not None else 1
        self.incidents[dedup_key] = {
            "status": "triggered",
            "severity": payload["severity"],
            "summary": payload["summary"],
            "triggers": triggers,
        }
