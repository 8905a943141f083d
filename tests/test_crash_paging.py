"""Paging for flow runs that crash or time out, through the PagerDuty stand-in.

The worker case, where the flow's process dies and the worker runs the hook,
is in tests/test_worker.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time

import httpx
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Crashed

from tasks.paging import page_flow_crash
from ue_pilot.sandbox.pagerduty import create_pagerduty_app
from ue_pilot.sandbox.servers import start_server


class SimulatedCrash(BaseException):
    """Raised by a drill flow: Prefect treats a BaseException as a crash."""


@pytest.fixture
def pagerduty(monkeypatch):
    """The PagerDuty stand-in, with the UE_ settings that point paging at it."""
    routing_key = secrets.token_hex(16)
    server = start_server(create_pagerduty_app(routing_key))
    for name in [n for n in os.environ if n.startswith("UE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("UE_PAGERDUTY_ROUTING_KEY", routing_key)
    monkeypatch.setenv("UE_PAGERDUTY_EVENTS_URL", server.url + "/v2/enqueue")
    yield server
    server.stop()


def events(server) -> list[dict]:
    return httpx.get(server.url + "/sandbox/events", trust_env=False).json()


@flow(
    name="crash-drill",
    on_failure=[page_flow_crash],
    on_crashed=[page_flow_crash],
)
def crash_drill(mode: str) -> str:
    """Time out, crash or fail on request, as a flow run can."""
    if mode == "timeout":
        # Short sleeps: under pytest-timeout's SIGALRM handler Prefect times out
        # a flow from a watcher thread, whose exception lands only between
        # Python statements, so one long sleep would end in the next test.
        for _ in range(100):
            time.sleep(0.1)
    if mode == "crash":
        raise SimulatedCrash("the process went away")
    if mode == "fail":
        raise ValueError("an ordinary failure")
    return mode


def test_timeout_pages_once(prefect_server, pagerduty):
    """A run that exceeds its time limit sends one error event for its flow."""
    state = crash_drill.with_options(timeout_seconds=1)("timeout", return_state=True)
    assert state.name == "TimedOut"
    (event,) = events(pagerduty)
    assert event["dedup_key"] == "ue-pilot/crash-drill/flow.crashed"
    assert event["payload"]["severity"] == "error"
    assert "timed out" in event["payload"]["summary"]


def test_crash_pages_once(prefect_server, pagerduty):
    """A run that crashes sends one error event naming the crash."""
    with pytest.raises(SimulatedCrash):
        crash_drill("crash")
    (event,) = events(pagerduty)
    assert event["dedup_key"] == "ue-pilot/crash-drill/flow.crashed"
    assert event["payload"]["severity"] == "error"
    assert "crashed" in event["payload"]["summary"]


def test_ordinary_failure_does_not_page(prefect_server, pagerduty):
    """A failure that is not a timeout is left to the flow: no event."""
    state = crash_drill("fail", return_state=True)
    assert state.is_failed()
    assert events(pagerduty) == []


def test_crash_of_deployment_run_pages_deployment(prefect_server, pagerduty):
    """A deployment's run pages under `<flow>/<deployment>` in the dedup key."""

    async def crash_deployment_run():
        async with get_client() as client:
            flow_id = await client.create_flow(crash_drill)
            deployment_id = await client.create_deployment(
                flow_id=flow_id, name=f"drill-{secrets.token_hex(4)}"
            )
            deployment = await client.read_deployment(deployment_id)
            flow_run = await client.create_flow_run_from_deployment(deployment_id)
        await page_flow_crash(crash_drill, flow_run, Crashed(message="killed"))
        return deployment.name

    name = asyncio.run(crash_deployment_run())
    (event,) = events(pagerduty)
    assert event["dedup_key"] == f"ue-pilot/crash-drill/{name}/flow.crashed"


def test_crash_hook_never_raises(prefect_server, pagerduty, monkeypatch, caplog):
    """With invalid settings the hook logs the error and returns."""
    monkeypatch.setenv("UE_PILOT_ORG_IDS", "not an org id")
    with caplog.at_level(logging.ERROR):
        with pytest.raises(SimulatedCrash):
            crash_drill("crash")
    assert events(pagerduty) == []
    assert "paging for Crashed of flow run" in caplog.text
    assert "ValidationError" in caplog.text


def test_crash_page_leaves_out_secrets(prefect_server, pagerduty, monkeypatch):
    """A secret quoted in the crash message is masked in the event."""
    token = "tok_" + secrets.token_hex(12)
    monkeypatch.setenv("UE_LOGS_STATIC_TOKEN", token)

    async def page():
        async with get_client() as client:
            flow_id = await client.create_flow(crash_drill)
            flow_run = await client.create_flow_run(crash_drill, parameters={})
        assert flow_id
        await page_flow_crash(
            crash_drill, flow_run, Crashed(message=f"connect failed with {token}")
        )

    asyncio.run(page())
    (event,) = events(pagerduty)
    assert token not in str(event)
    assert "[redacted]" in event["payload"]["summary"]
