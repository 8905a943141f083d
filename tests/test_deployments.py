"""Deployments: the registry `serve` builds, prefect.yaml, and the hourly audit's
schedule and one-run-at-a-time limit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.states import Scheduled
from prefect.utilities.callables import parameter_schema

from deployments import DEPLOYMENTS, DeploymentSpec, build_deployments, load_flow
from deployments.audit import audit_deployment
from ue_pilot.settings import FlowRunSettings

ROOT = Path(__file__).resolve().parent.parent


def prefect_yaml() -> list[dict]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def yaml_deployment(spec: DeploymentSpec) -> dict:
    (entry,) = [d for d in prefect_yaml() if d["entrypoint"] == spec.entrypoint]
    return entry


def test_audit_deployment_is_hourly():
    """The audit deployment runs at the top of every hour in the given timezone."""
    deployment = audit_deployment("America/Toronto")
    schedule = deployment.schedules[0].schedule
    assert schedule.cron == "0 * * * *"
    assert schedule.timezone == "America/Toronto"


def test_audit_deployment_timezone_from_setting(monkeypatch):
    """Without an argument the cron timezone is UE_SCHEDULE_TIMEZONE."""
    monkeypatch.setenv("UE_SCHEDULE_TIMEZONE", "Europe/Paris")
    deployment = audit_deployment()
    assert deployment.schedules[0].schedule.timezone == "Europe/Paris"


def test_schedule_timezone_rejects_unknown():
    """An unknown timezone is rejected with the setting's name and an example."""
    with pytest.raises(ValueError, match="UE_SCHEDULE_TIMEZONE.*America/Toronto"):
        FlowRunSettings(schedule_timezone="Mars/Olympus")


def test_audit_deployment_cancels_overlap():
    """A run due while another runs is cancelled, not queued."""
    deployment = audit_deployment()
    assert deployment.concurrency_limit == 1
    assert deployment.concurrency_options.collision_strategy == "CANCEL_NEW"


def test_registry_lists_every_flow():
    """The registry has one deployment per flow, with prefect.yaml's entrypoints."""
    assert [s.full_name for s in DEPLOYMENTS] == [
        "isolation-audit/hourly",
        "onboarding/on-demand",
        "export-all/on-demand",
        "rollback/on-demand",
    ]
    assert [s.entrypoint for s in DEPLOYMENTS] == [
        d["entrypoint"] for d in prefect_yaml()
    ]


def test_build_deployments_builds_every_flow():
    """Every deployment of the registry is built, in the order of prefect.yaml."""
    built = build_deployments(FlowRunSettings())
    assert [d.flow_name for d in built] == [s.flow_name for s in DEPLOYMENTS]
    assert [d.name for d in built] == [s.name for s in DEPLOYMENTS]


def test_load_flow_raises_missing_module():
    """A flow module that does not exist is an import error, not a skip."""
    spec = DeploymentSpec("gone", "on-demand", "flows/gone.py:gone", "x")
    with pytest.raises(ModuleNotFoundError, match="flows.gone"):
        load_flow(spec)


def test_load_flow_raises_other_import_errors(tmp_path, monkeypatch):
    """A flow module that exists but fails to import raises its import error."""
    package = tmp_path / "brokenflows"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "broken.py").write_text("import module_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = DeploymentSpec("broken", "on-demand", "brokenflows/broken.py:broken", "x")
    with pytest.raises(ModuleNotFoundError, match="module_that_is_not_installed"):
        load_flow(spec)


@pytest.mark.parametrize("spec", DEPLOYMENTS, ids=lambda s: s.full_name)
def test_deployment_matches_prefect_yaml(spec):
    """`serve` builds each deployment as prefect.yaml declares it."""
    (built,) = [d for d in build_deployments() if d.flow_name == spec.flow_name]
    declared = yaml_deployment(spec)
    assert built.name == declared["name"]
    assert built.entrypoint == declared["entrypoint"]
    assert built.description == declared["description"]
    assert built.tags == declared["tags"]
    assert [s.schedule.cron for s in built.schedules] == [
        s["cron"] for s in declared.get("schedules", [])
    ]
    limit = declared.get("concurrency_limit") or {}
    assert built.concurrency_limit == limit.get("limit")
    if limit:
        strategy = built.concurrency_options.collision_strategy
        assert strategy == limit["collision_strategy"]


def test_prefect_yaml_audit_timezone_is_the_setting():
    """prefect.yaml takes the audit's cron timezone from UE_SCHEDULE_TIMEZONE."""
    (schedule,) = yaml_deployment(DEPLOYMENTS[0])["schedules"]
    assert schedule["timezone"] == "{{ $UE_SCHEDULE_TIMEZONE }}"


def test_prefect_yaml_uses_work_pool():
    """Every deployment of prefect.yaml runs on the ue-pilot process work pool."""
    for declared in prefect_yaml():
        assert declared["work_pool"]["name"] == "ue-pilot"


@pytest.mark.parametrize("spec", DEPLOYMENTS, ids=lambda s: s.full_name)
def test_every_parameter_has_description(spec):
    """Every flow parameter has a description for the UI's run form."""
    flow = load_flow(spec)
    properties = parameter_schema(flow).model_dump()["properties"]
    assert properties
    for name, schema in properties.items():
        assert schema.get("description"), f"{spec.full_name}: {name}"


def test_prefect_yaml_entrypoints_exist():
    """Every entrypoint in prefect.yaml names an existing file and function."""
    for deployment in prefect_yaml():
        path, _, function = deployment["entrypoint"].partition(":")
        source = (ROOT / path).read_text()
        assert f"def {function}(" in source


def create_runs(client, deployment_id, offsets_hours: list[float], now: datetime):
    """Create Scheduled runs of a deployment, due `offset` hours from `now`."""
    return [
        client.create_flow_run_from_deployment(
            deployment_id,
            state=Scheduled(scheduled_time=now + timedelta(hours=offset)),
        ).id
        for offset in offsets_hours
    ]


def test_cancel_missed_runs_bounds_backlog(prefect_server):
    """Only the due, unstarted runs of the same deployment are cancelled."""
    from deployments.catch_up import cancel_missed_runs
    from flows.isolation_audit import isolation_audit

    now = datetime.now(UTC)
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(isolation_audit)
        hourly = client.create_deployment(flow_id=flow_id, name="catch-up-hourly")
        other = client.create_deployment(flow_id=flow_id, name="catch-up-other")
        runs = create_runs(client, hourly, [-3, -2, -1, 0, 1], now)
        *missed, current, upcoming = runs
        (elsewhere,) = create_runs(client, other, [-2], now)

        later = now + timedelta(seconds=1)
        cancelled = cancel_missed_runs(client, hourly, current, later)

        states = [client.read_flow_run(run).state for run in missed]
        untouched = [
            client.read_flow_run(run).state for run in (current, upcoming, elsewhere)
        ]
    assert sorted(run.id for run in cancelled) == sorted(missed)
    for state in states:
        assert state.is_cancelled()
        assert str(current) in state.message
    for state in untouched:
        assert state.is_scheduled()


def test_supersede_missed_runs_outside_deployment(prefect_server):
    """A run that is not a deployment's run cancels nothing."""
    from prefect import flow

    from deployments.catch_up import supersede_missed_runs

    @flow(name="catch-up-probe")
    def probe() -> int:
        return supersede_missed_runs()

    assert probe() == 0
