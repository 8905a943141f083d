"""Deployments: the hourly audit schedule and its one-run-at-a-time limit."""

from __future__ import annotations

from pathlib import Path

import yaml

from deployments.audit import audit_deployment

ROOT = Path(__file__).resolve().parent.parent


def test_audit_deployment_is_hourly():
    """The audit deployment runs at the top of every hour in the given timezone."""
    deployment = audit_deployment("America/Toronto")
    schedule = deployment.schedules[0].schedule
    assert schedule.cron == "0 * * * *"
    assert schedule.timezone == "America/Toronto"


def test_audit_deployment_cancels_overlap():
    """A run due while another runs is cancelled, not queued."""
    deployment = audit_deployment()
    assert deployment.concurrency_limit == 1
    assert deployment.concurrency_options.collision_strategy == "CANCEL_NEW"


def test_prefect_yaml_entrypoints_exist():
    """Every entrypoint in prefect.yaml names an existing file and function."""
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        path, _, function = deployment["entrypoint"].partition(":")
        source = (ROOT / path).read_text()
        assert f"def {function}(" in source
