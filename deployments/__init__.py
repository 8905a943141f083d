"""Deployments of the flows: built here for `ue-pilot serve`, declared in
prefect.yaml for `prefect deploy --all` on a work pool.

`DEPLOYMENTS` lists the same deployments as prefect.yaml, and
tests/test_deployments.py checks that the two agree. Flow modules are imported
only when the deployments are built, so that a flow can import from this
package.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ue_pilot.settings import FlowRunSettings

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

TAG = "ue-pilot"
WORK_POOL = "ue-pilot"


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment of prefect.yaml: its flow, name, entrypoint and description."""

    flow_name: str
    name: str
    entrypoint: str
    description: str

    @property
    def full_name(self) -> str:
        """`<flow name>/<deployment name>`, as `prefect deployment run` takes it."""
        return f"{self.flow_name}/{self.name}"

    @property
    def module(self) -> str:
        """Dotted module name of the entrypoint's file."""
        path = self.entrypoint.partition(":")[0]
        return path.removesuffix(".py").replace("/", ".")

    @property
    def function(self) -> str:
        """Name of the flow function in the module."""
        return self.entrypoint.partition(":")[2]

    @property
    def tags(self) -> list[str]:
        return [TAG, self.flow_name]


DEPLOYMENTS: tuple[DeploymentSpec, ...] = (
    DeploymentSpec(
        "isolation-audit",
        "hourly",
        "flows/isolation_audit.py:isolation_audit",
        "Hourly isolation audit of every pilot org.",
    ),
    DeploymentSpec(
        "onboarding",
        "on-demand",
        "flows/onboarding.py:onboarding",
        "Onboard a new pilot org, as the runbook's Pilot Onboarding steps.",
    ),
    DeploymentSpec(
        "export-all",
        "on-demand",
        "flows/export_all.py:export_all",
        "Export every configured export of one pilot org to Blob Storage.",
    ),
    DeploymentSpec(
        "rollback",
        "on-demand",
        "flows/rollback.py:rollback",
        "Roll back a pilot org, as the runbook's Rollback steps.",
    ),
)


def load_flow(spec: DeploymentSpec) -> Flow:
    """Import the flow of `spec`; an import error is raised, never skipped."""
    module = importlib.import_module(spec.module)
    return getattr(module, spec.function)


def build_deployment(
    spec: DeploymentSpec, flow: Flow, settings: FlowRunSettings
) -> RunnerDeployment:
    """Build the deployment of `spec` for `serve`, as prefect.yaml declares it."""
    from deployments.audit import audit_deployment

    if spec.flow_name == "isolation-audit":
        return audit_deployment(settings.schedule_timezone)
    return flow.to_deployment(
        name=spec.name, description=spec.description, tags=spec.tags
    )


def build_deployments(
    settings: FlowRunSettings | None = None,
) -> list[RunnerDeployment]:
    """Build every deployment, in the order of prefect.yaml."""
    settings = settings or FlowRunSettings()
    return [build_deployment(spec, load_flow(spec), settings) for spec in DEPLOYMENTS]
