"""Shared fixtures: one Prefect test server per session, sandboxes on demand."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect server and database for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def ue_env(monkeypatch):
    """Apply a sandbox's UE_ settings to this test's environment."""

    def apply(env: dict[str, str]) -> None:
        for name in [n for n in os.environ if n.startswith("UE_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)

    return apply
