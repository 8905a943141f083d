"""Tests of the PagerDuty Events API v2 stand-in over real HTTP."""

from __future__ import annotations

import httpx
import pytest

from ue_pilot.sandbox.pagerduty import create_pagerduty_app
from ue_pilot.sandbox.servers import start_server

ROUTING_KEY = "0123456789abcdef0123456789abcdef"


def trigger_event(**overrides) -> dict:
    """Return a valid trigger event, with `overrides` replacing top-level fields."""
    event = {
        "routing_key": ROUTING_KEY,
        "event_action": "trigger",
        "dedup_key": "ue-pilot/rls.fail_open/org_a",
        "payload": {
            "summary": "RLS fail-open on org_a",
            "source": "ue-pilot",
            "severity": "critical",
        },
    }
    event.update(overrides)
    return event


def trigger_with_payload(**payload_overrides) -> dict:
    """Return a valid trigger event whose payload fields are replaced."""
    event = trigger_event()
    event["payload"] = {**event["payload"], **payload_overrides}
    return event


def follow_up(action: str, dedup_key: str = "ue-pilot/rls.fail_open/org_a") -> dict:
    return {"routing_key": ROUTING_KEY, "event_action": action, "dedup_key": dedup_key}


@pytest.fixture(scope="module")
def server():
    running = start_server(create_pagerduty_app(ROUTING_KEY))
    yield running
    running.stop()


@pytest.fixture
def http(server):
    """An HTTP client on the stand-in, with its events cleared before the test."""
    with httpx.Client(base_url=server.url) as client:
        client.delete("/sandbox/events")
        yield client


INVALID_EVENTS = [
    pytest.param(trigger_event(routing_key="f" * 32), id="wrong_routing_key"),
    pytest.param(trigger_event(event_action="escalate"), id="unknown_action"),
    pytest.param(trigger_event(dedup_key="k" * 256), id="dedup_key_too_long"),
    pytest.param(trigger_event(dedup_key=42), id="dedup_key_not_string"),
    pytest.param(trigger_event(payload=None), id="payload_missing"),
    pytest.param(trigger_with_payload(summary=""), id="summary_blank"),
    pytest.param(trigger_with_payload(summary="s" * 1025), id="summary_too_long"),
    pytest.param(trigger_with_payload(source=None), id="source_missing"),
    pytest.param(trigger_with_payload(severity="P1"), id="severity_unknown"),
    pytest.param(
        {"routing_key": ROUTING_KEY, "event_action": "acknowledge"},
        id="acknowledge_without_dedup_key",
    ),
    pytest.param(
        {"routing_key": ROUTING_KEY, "event_action": "resolve"},
        id="resolve_without_dedup_key",
    ),
    pytest.param(["not", "an", "object"], id="not_an_object"),
]


def test_trigger_accepted_status(http):
    """A valid trigger is accepted with 202."""
    response = http.post("/v2/enqueue", json=trigger_event())

    assert response.status_code == 202


def test_trigger_accepted_body(http):
    """The 202 body reports success and echoes the dedup key."""
    response = http.post("/v2/enqueue", json=trigger_event())

    assert response.json() == {
        "status": "success",
        "message": "Event processed",
        "dedup_key": "ue-pilot/rls.fail_open/org_a",
    }


def test_trigger_generates_dedup_key(http):
    """A trigger without a dedup key gets a generated one."""
    event = trigger_event()
    del event["dedup_key"]

    response = http.post("/v2/enqueue", json=event)

    assert len(response.json()["dedup_key"]) == 32


def test_summary_at_limit_accepted(http):
    """A summary of exactly 1024 characters is accepted."""
    response = http.post("/v2/enqueue", json=trigger_with_payload(summary="s" * 1024))

    assert response.status_code == 202


@pytest.mark.parametrize("event", INVALID_EVENTS)
def test_invalid_event_status(http, event):
    """Each invalid event is rejected with 400."""
    response = http.post("/v2/enqueue", json=event)

    assert response.status_code == 400


@pytest.mark.parametrize("event", INVALID_EVENTS)
def test_invalid_event_body(http, event):
    """Each 400 body reports an invalid event and lists at least one error."""
    body = http.post("/v2/enqueue", json=event).json()

    assert body["status"] == "invalid event"
    assert body["message"] == "Event object is invalid"
    assert body["errors"] != []


def test_invalid_json_rejected(http):
    """A body that is not JSON is rejected with 400."""
    headers = {"Content-Type": "application/json"}

    response = http.post("/v2/enqueue", content=b"{not json", headers=headers)

    assert response.status_code == 400


def test_invalid_event_not_recorded(http):
    """A rejected event does not appear in the recorded events."""
    http.post("/v2/enqueue", json=trigger_with_payload(severity="P1"))

    assert http.get("/sandbox/events").json() == []


def test_events_recorded(http):
    """Accepted events are returned in order of arrival."""
    http.post("/v2/enqueue", json=trigger_event())
    http.post("/v2/enqueue", json=follow_up("resolve"))

    events = http.get("/sandbox/events").json()

    assert [event["event_action"] for event in events] == ["trigger", "resolve"]


def test_recorded_event_omits_routing_key(http):
    """The recorded event leaves out the routing key."""
    http.post("/v2/enqueue", json=trigger_event())

    events = http.get("/sandbox/events").json()

    assert "routing_key" not in events[0]


def test_clear_events(http):
    """DELETE /sandbox/events removes the recorded events."""
    http.post("/v2/enqueue", json=trigger_event())

    http.delete("/sandbox/events")

    assert http.get("/sandbox/events").json() == []


def test_clear_incidents(http):
    """DELETE /sandbox/events also removes the incidents."""
    http.post("/v2/enqueue", json=trigger_event())

    http.delete("/sandbox/events")

    assert http.get("/sandbox/incidents").json() == {}


def test_incident_triggered(http):
    """A trigger opens an incident with its severity and summary."""
    http.post("/v2/enqueue", json=trigger_event())

    incidents = http.get("/sandbox/incidents").json()

    assert incidents == {
        "ue-pilot/rls.fail_open/org_a": {
            "status": "triggered",
            "severity": "critical",
            "summary": "RLS fail-open on org_a",
            "triggers": 1,
        }
    }


def test_repeated_trigger_deduplicated(http):
    """A second trigger with the same dedup key counts into the open incident."""
    http.post("/v2/enqueue", json=trigger_event())
    http.post("/v2/enqueue", json=trigger_event())

    incidents = http.get("/sandbox/incidents").json()

    assert incidents["ue-pilot/rls.fail_open/org_a"]["triggers"] == 2


def test_acknowledge_incident(http):
    """An acknowledge moves the incident to acknowledged."""
    http.post("/v2/enqueue", json=trigger_event())
    http.post("/v2/enqueue", json=follow_up("acknowledge"))

    incidents = http.get("/sandbox/incidents").json()

    assert incidents["ue-pilot/rls.fail_open/org_a"]["status"] == "acknowledged"


def test_resolve_incident(http):
    """A resolve moves the incident to resolved."""
    http.post("/v2/enqueue", json=trigger_event())
    http.post("/v2/enqueue", json=follow_up("resolve"))

    incidents = http.get("/sandbox/incidents").json()

    assert incidents["ue-pilot/rls.fail_open/org_a"]["status"] == "resolved"


def test_acknowledge_after_resolve_ignored(http):
    """An acknowledge for a resolved incident leaves it resolved."""
    http.post("/v2/enqueue", json=trigger_event())
    http.post("/v2/enqueue", json=follow_up("resolve"))
    http.post("/v2/enqueue", json=follow_up("acknowledge"))

    incidents = http.get("/sandbox/incidents").json()

    assert incidents["ue-pilot/rls.fail_open/org_a"]["status"] == "resolved"


def test_trigger_after_resolve_reopens(http):
    """A trigger after a resolve opens the incident again."""
    http.post("/v2/enqueue", json=trigger_event())
    http.post("/v2/enqueue", json=follow_up("resolve"))
    http.post("/v2/enqueue", json=trigger_event())

    incident = http.get("/sandbox/incidents").json()["ue-pilot/rls.fail_open/org_a"]

    assert incident["status"] == "triggered"
    assert incident["triggers"] == 2


def test_resolve_unknown_key_accepted(http):
    """A resolve for an unknown dedup key is accepted with 202."""
    response = http.post("/v2/enqueue", json=follow_up("resolve", "never-triggered"))

    assert response.status_code == 202


def test_resolve_unknown_key_no_incident(http):
    """A resolve for an unknown dedup key opens no incident."""
    http.post("/v2/enqueue", json=follow_up("resolve", "never-triggered"))

    assert http.get("/sandbox/incidents").json() == {}
