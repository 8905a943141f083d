"""Pilot onboarding of a new org: the runbook's seven onboarding steps, each
proved by checks.

1. Create the Clerk organization, or adopt it on a re-run.
2. Configure RLS context. UE sets the tenant context from the session's org on
   every request, so nothing is written per org: the step proves that the
   context statement reads back the new org and that row-level security holds.
3. Seed required data: the org's seed scripts, each applied once.
4. Verify isolation: the audit's RLS, access and telemetry checks for the org.
5. Confirm that the export routes return 401 without a session.
6. Confirm that the cross-org routes require the minimum role.
7. Enable monitoring: a synthetic cross-org event is detected by the audit's
   query and pages, and PagerDuty accepts the page and its resolve.

A step passes only when every one of its checks passes. Steps 1 to 7 run in a
Prefect transaction. When a step after step 1 fails, the rollback hook of
step 1 disables the org in Clerk (nothing is deleted) and records the step, the
error and the run id in its metadata. Only a run in which every step passed
sets the org's pilot status to active.

A re-run with the same slug and creator adopts the org, skips the seed scripts
it already applied and runs every check again. It changes nothing in Clerk or
the database, but step 7 sends one more labelled test event and test page. An
org disabled by a failed onboarding is reopened (status onboarding) and becomes
active only when every step passes again. An org that a rollback disabled is
never reopened.

Every run that created or adopted an org, whether its steps passed or not, ends
with an evidence record of the org (family "onboarding"): the checks of every
step run and the compensation. A run that times out or is interrupted writes none.

Run once: `ue-pilot onboard --name NAME --slug SLUG` (or with `--sandbox`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import TerminationSignal
from prefect.states import Failed, State
from prefect.transactions import get_transaction, transaction
from pydantic import SecretStr

from flows.isolation_audit import gather
from tasks.database import (
    GLOBAL_CHECKS,
    POSTURE_CHECKS,
    inspect_rls_posture,
    probe_rls_context,
)
from tasks.evidence import evidence_outcome, write_evidence_record
from tasks.http_access import probe_access
from tasks.identity import (
    IdentityProviderError,
    InvalidOrgRequestError,
    OrganizationConflictError,
    activate_org,
    confirm_org_disabled,
    create_clerk_org,
    get_organization,
    obtain_probe_sessions,
    open_clerk,
    org_status,
    validate_org_name,
    validate_slug,
    validate_user_id,
)
from tasks.paging import dedup_key, escalate, page_flow_crash
from tasks.seeding import (
    SeedFolderError,
    SeedScript,
    load_seed_scripts,
    run_seed_scripts,
)
from tasks.state import register_probe_agent
from tasks.telemetry_ingest import (
    await_detection,
    page_checks,
    plant_synthetic_event,
    query_telemetry_isolation,
)
from ue_pilot.checks import CheckResult, Status, failed, inconclusive, passed, verdict
from ue_pilot.orgids import InvalidOrgIdError, validate_org_id
from ue_pilot.redact import install_log_redaction, redact_checks, redact_text
from ue_pilot.results import flow_run_settings, key_results_by_run, result_storage
from ue_pilot.settings import Settings


@dataclass(frozen=True)
class Step:
    """One step of the checklist and the check ids that must pass for it."""

    number: int
    title: str
    checks: tuple[str, ...]


STEPS = (
    Step(1, "Create Clerk organization", ("onboarding.clerk_org",)),
    Step(2, "Configure RLS context",
         POSTURE_CHECKS + ("rls.context_readback", "rls.pool_reuse")),
    Step(3, "Seed required data", ("onboarding.seed_scripts",)),
    Step(4, "Verify isolation", (
        "rls.cross_org_rows", "rls.fail_open", "telemetry.liveness",
        "telemetry.cross_org_events", "access.probe_sessions",
        "access.export_allows_own_org", "access.export_rejects_other_org",
        "access.export_rows_belong_to_org",
    )),
    Step(5, "Confirm export routes require auth",
         ("access.export_requires_auth", "access.auth_bypass")),
    Step(6, "Verify cross-org routes", (
        "access.cross_org_requires_auth", "access.cross_org_requires_role",
        "access.cross_org_allows_min_role",
    )),
    Step(7, "Enable monitoring", (
        "onboarding.synthetic_event", "onboarding.detection",
        "onboarding.test_page_sent", "onboarding.test_page_resolved",
    )),
    # Not a runbook step: the org is opened for use once every step passed.
    Step(8, "Set the org active", ("onboarding.org_active",)),
)
STEP_BY_NUMBER = {step.number: step for step in STEPS}


class OnboardingRequestError(ValueError):
    """Onboarding cannot start: a bad name, slug, creator or seed folder."""


class StepFailedError(RuntimeError):
    """A step has a check that did not pass. The message names the failed checks."""

    def __init__(self, step: Step, checks: list[CheckResult]) -> None:
        problems = [f"{c.id} {c.status.value}: {c.summary}" for c in checks
                    if c.status != Status.PASS]
        super().__init__("; ".join(problems[:3]))
        self.step = step


@dataclass
class Run:
    """State of one onboarding run: its settings, the org and each step's checks."""

    settings: Settings
    run_id: str
    org: dict | None = None
    results: dict[int, list[CheckResult]] = field(default_factory=dict)
    current: Step = STEPS[0]

    @property
    def org_id(self) -> str:
        assert self.org is not None, "step 1 sets the org"
        return self.org["org"]

    def start(self, number: int) -> None:
        self.current = STEP_BY_NUMBER[number]
        get_run_logger().info("step %d: %s", number, self.current.title)

    def prove(self, checks: list[CheckResult]) -> None:
        """Record the step's checks, and raise StepFailedError unless all passed.

        A check the step needs that did not run is added as inconclusive, so a
        missing result can never pass a step.
        """
        step = self.current
        org = self.org["org"] if self.org else None
        kept = [c for c in checks if c.id in step.checks]
        ran = {c.id for c in kept}
        kept += [inconclusive(check_id, "the check did not run", org)
                 for check_id in step.checks if check_id not in ran]
        kept = redact_checks(kept, self.settings.secret_values())
        self.results[step.number] = kept
        if verdict(kept) != Status.PASS:
            raise StepFailedError(step, kept)

    def use_probe_sessions(self, sessions: dict[str, str]) -> None:
        """Add the new org's probe sessions to the settings and to log redaction."""
        merged = self.settings.probe_session_map() | {self.org_id: sessions}
        self.settings = self.settings.model_copy(
            update={"probe_sessions": SecretStr(json.dumps(merged))}
        )
        install_log_redaction(self.settings.secret_values())

    def status_of(self, step: Step) -> str:
        if step.number not in self.results:
            return "not run"
        return verdict(self.results[step.number]).value


@flow(
    name="onboarding",
    description="Onboard a new pilot org: create it in Clerk, seed it, prove its "
    "isolation, auth gates and monitoring, or disable it when a step fails.",
    persist_result=True,
    result_storage=result_storage(),
    result_serializer="json",
    timeout_seconds=flow_run_settings().onboarding_timeout_seconds,
    on_failure=[page_flow_crash],
    on_crashed=[page_flow_crash],
)
def onboarding(name: str, slug: str, created_by: str = "", seed_dir: str = "") -> dict:
    """Onboard one org and return the outcome with every step's checks.

    Args:
        name: The org's display name in Clerk.
        slug: The org's Clerk slug: lowercase letters, digits and dashes.
        created_by: Clerk user id of the operator who creates the org
            (default: UE_ONBOARDING_CREATED_BY).
        seed_dir: Folder of the org's seed scripts, applied in name order
            (default: UE_SEED_SCRIPTS_DIR).
    """
    key_results_by_run()
    logger = get_run_logger()
    settings = Settings()
    install_log_redaction(settings.secret_values())
    created_by = created_by or settings.onboarding_created_by
    seed_dir = seed_dir or settings.seed_scripts_dir
    scripts = validate_request(name, slug, created_by, seed_dir)
    run = Run(settings, str(runtime.flow_run.id))
    logger.info("onboarding %r (slug %s) at %s", name, slug, settings.base_url)

    try:
        with transaction() as txn:
            try:
                create_organization(run, name, slug, created_by)     # 1
                configure_rls_context(run)                           # 2
                seed_required_data(run, scripts)                     # 3
                access = verify_isolation(run)                       # 4
                confirm_export_auth(run, access)                     # 5
                verify_cross_org_routes(run, access)                 # 6
                enable_monitoring(run)                               # 7
                set_org_active(run)
            except BaseException as error:
                # A timeout or an interrupt is recorded for the transaction's
                # rollback hook too.
                txn.set("failure", failure_record(run, error))
                raise
    except Exception as error:
        return finish_failed(run, error)
    except (KeyboardInterrupt, TerminationSignal) as error:
        # The transaction's hook has disabled the org. The run still ends
        # interrupted, after its evidence is written.
        finish_failed(run, error)
        raise
    return finish(run, None)


def validate_request(
    name: str, slug: str, created_by: str, seed_dir: str
) -> list[SeedScript]:
    """Check every parameter before any request; return the seed scripts in order."""
    try:
        validate_org_name(name)
        validate_slug(slug)
        validate_user_id(created_by)
        return load_seed_scripts(seed_dir)
    except (InvalidOrgRequestError, SeedFolderError) as error:
        raise OnboardingRequestError(str(error)) from None


# Step 1


def create_organization(run: Run, name: str, slug: str, created_by: str) -> None:
    """Create or adopt the org; a conflict fails the run before any org is touched."""
    run.start(1)
    try:
        reject_rolled_back_org(run.settings, slug)
        run.org = create_clerk_org(run.settings, name, slug, created_by, run.run_id)
    except IdentityProviderError as error:
        # A failed check makes prove raise, so no org is recorded below.
        run.prove([failed("onboarding.clerk_org", str(error))])
    # From here on a failure disables the org: the rollback hook reads its id.
    get_transaction().set("org_id", run.org_id)
    details = {key: value for key, value in run.org.items() if key != "org"}
    try:
        # The id goes into URLs, queries and metadata from here on.
        validate_org_id(run.org_id, run.settings.org_id_pattern)
    except InvalidOrgIdError as error:
        run.prove([failed("onboarding.clerk_org", str(error), None, **details)])
    run.prove([passed("onboarding.clerk_org", f"org {run.org['outcome']}",
                      run.org_id, **details)])


def reject_rolled_back_org(settings: Settings, slug: str) -> None:
    """Raise OrganizationConflictError when the org with this slug was rolled back.

    A rollback writes its rollback id into the org's status details. Onboarding
    never reopens or adopts such an org, because only a deliberate decision
    may bring a rolled-back org back.
    """
    organization = get_organization(open_clerk(settings), slug)
    if organization is None:
        return
    record = org_status(settings, organization)
    if record.get("rollback_id"):
        raise OrganizationConflictError(
            f"org {organization.id} ({slug!r}) was rolled back (rollback "
            f"{record['rollback_id']}, status {record['status']!r}); onboarding "
            "never reopens a rolled-back org. Onboard it under a new slug, or "
            "re-enable it deliberately first"
        )


# Step 2


def configure_rls_context(run: Run) -> None:
    run.start(2)
    posture = inspect_rls_posture.submit(run.settings)
    context = probe_rls_context.submit(run.settings, [run.org_id])
    run.prove(gather(posture, POSTURE_CHECKS) + gather(context, GLOBAL_CHECKS))


# Step 3


def seed_required_data(run: Run, scripts: list[SeedScript]) -> None:
    run.start(3)
    run.prove([run_seed_scripts(run.settings, run.org, scripts, run.run_id)])


# Step 4


def verify_isolation(run: Run) -> list[CheckResult]:
    """Prove that the org reads only its own rows, and return the access checks.

    The access probes need the org's probe sessions and another pilot org's
    session, which tries to read the new org's export.
    """
    run.start(4)
    run.use_probe_sessions(obtain_probe_sessions(run.settings, run.org_id))
    orgs = [run.org_id] + other_pilot_orgs(run.settings, run.org_id)[:1]
    agent, _ = register_probe_agent(run.settings)

    access = probe_access.submit(run.settings, orgs, agent)
    context = probe_rls_context.submit(run.settings, [run.org_id])
    telemetry = query_telemetry_isolation.submit(run.settings, run.org_id)
    access_checks = [
        check for check in gather(access, ("access.probe_sessions",), [run.org_id])
        if check.org in (run.org_id, None)
    ]
    run.prove(
        access_checks
        + gather(context, GLOBAL_CHECKS)
        + gather(telemetry, ("telemetry.liveness",))
    )
    return access_checks


def other_pilot_orgs(settings: Settings, org_id: str) -> list[str]:
    """Return the pilot orgs, other than `org_id`, that have a probe session."""
    sessions = settings.probe_session_map()
    return [
        org for org in settings.pilot_org_ids if org != org_id and sessions.get(org)
    ]


# Steps 5 and 6


def confirm_export_auth(run: Run, access: list[CheckResult]) -> None:
    run.start(5)
    run.prove(access)


def verify_cross_org_routes(run: Run, access: list[CheckResult]) -> None:
    run.start(6)
    run.prove(access)


# Step 7


def enable_monitoring(run: Run) -> None:
    """Plant the synthetic event, wait for the audit's query, page and resolve."""
    run.start(7)
    checks = [plant_synthetic_event(run.settings, run.org_id, run.run_id)]
    if checks[-1].status == Status.PASS:
        sent_at = checks[-1].observed["sent_at"]
        checks.append(await_detection(run.settings, run.org_id, run.run_id, sent_at))
    if checks[-1].status == Status.PASS:
        checks += send_test_page(run.settings, run.org_id, run.run_id)
    run.prove(checks)


def send_test_page(settings: Settings, org_id: str, run_id: str) -> list[CheckResult]:
    """Page through the audit's escalation, then resolve the page the same way."""
    trigger, resolve = page_checks(org_id, run_id)
    key = dedup_key(trigger)
    sent = escalate.submit(settings, [trigger]).result()
    checks = [paging_check("onboarding.test_page_sent", "triggered", key, sent, org_id)]
    if checks[0].status == Status.PASS:
        resolved = escalate.submit(settings, [resolve]).result()
        checks.append(paging_check("onboarding.test_page_resolved", "resolved", key,
                                   resolved, org_id))
    return checks


def paging_check(
    check_id: str, action: str, key: str, paging: dict, org_id: str
) -> CheckResult:
    """Pass when escalate lists `key` under `action`, else fail with its report."""
    if "skipped" in paging:
        return failed(check_id, f"paging skipped: {paging['skipped']}; set "
                      "UE_PAGERDUTY_ROUTING_KEY", org_id)
    if key in paging.get(action, []):
        return passed(check_id, f"PagerDuty accepted the test page ({action})",
                      org_id, dedup_key=key)
    return failed(check_id, f"PagerDuty did not accept the test page ({action})",
                  org_id, dedup_key=key, errors=paging.get("errors", []))


# After step 7


def set_org_active(run: Run) -> None:
    run.start(8)
    run.prove([activate_org(run.settings, run.org_id, run.run_id)])
    run.org = dict(run.org, status="active")


# Outcome and evidence


def failure_record(run: Run, error: Exception) -> dict:
    """Return what the compensation writes into the org's metadata."""
    if not isinstance(error, StepFailedError):
        error = f"{type(error).__name__}: {error}"
    message = redact_text(str(error), run.settings.secret_values())
    return {"run_id": run.run_id, "step": run.current.number,
            "step_title": run.current.title, "error": message}


def finish_failed(run: Run, error: BaseException) -> State:
    """Prove the compensation, publish the evidence, and fail the run."""
    logger = get_run_logger()
    failure = failure_record(run, error)
    if run.current.number not in run.results:
        # The step raised before it recorded its checks.
        run.results[run.current.number] = [
            failed(run.current.checks[0], failure["error"], run.org and run.org_id)
        ]
    compensation = None
    if run.org is not None:
        compensation = confirm_org_disabled(run.settings, run.org_id, run.run_id)
    result = finish(run, failure, compensation)
    logger.error("onboarding failed at step %d: %s", failure["step"],
                 failure["error"])
    return Failed(message=f"onboarding failed at step {failure['step']} "
                  f"({failure['step_title']}): {failure['error']}"[:1000],
                  data=result)


def finish(
    run: Run, failure: dict | None, compensation: CheckResult | None = None
) -> dict:
    """Build the run's result and publish the checklist and the checks table."""
    steps = [
        {"number": step.number, "title": step.title, "status": run.status_of(step),
         "checks": [check.to_dict() for check in run.results.get(step.number, [])]}
        for step in STEPS
    ]
    result = {
        "outcome": "failed" if failure else "onboarded",
        "flow_run_id": run.run_id,
        "org": run.org,
        "failure": failure,
        "compensation": compensation.to_dict() if compensation else None,
        "steps": steps,
    }
    publish_onboarding_evidence(result)
    result["evidence"] = record_onboarding(run, result, compensation)
    return result


def record_onboarding(
    run: Run, result: dict, compensation: CheckResult | None
) -> dict | None:
    """Write the org's evidence record of this run, failed or not.

    Returns None when no org was created or adopted, so there is no org to
    record, else the outcome of `write_evidence_record` or `{"error": ...}`.
    Every Exception is logged and returned instead of raised, so a record never
    takes the place of the run's outcome.
    """
    if run.org is None:
        return None
    checks = [check for number in sorted(run.results) for check in run.results[number]]
    if compensation is not None:
        checks.append(compensation)
    org = run.org
    target = {
        "base_url": run.settings.base_url,
        "org": org["org"],
        "name": org.get("name"),
        "slug": org.get("slug"),
        "created_by": org.get("created_by"),
        "org_outcome": org.get("outcome"),
        "outcome": result["outcome"],
        "failure": result["failure"],
    }
    records = {org["org"]: {"checks": checks, "target": target}}
    try:
        state = write_evidence_record(
            run.settings, "onboarding", records, return_state=True
        )
        return evidence_outcome(state)
    except Exception as problem:
        # Any error, a bug included, is reported here and not raised.
        message = redact_text(f"{type(problem).__name__}: {problem}",
                              run.settings.secret_values())[:500]
        get_run_logger().error("evidence record of onboarding %s not written: %s",
                               org["org"], message)
        return {"error": message}


@task(name="publish-onboarding-evidence", cache_policy=NO_CACHE)
def publish_onboarding_evidence(result: dict) -> None:
    """Write the onboarding checklist and the checks table as artifacts of this run."""
    create_markdown_artifact(
        key="onboarding-checklist",
        markdown=render_checklist(result),
        description="Runbook Pilot Onboarding checklist of this run",
    )
    create_table_artifact(
        key="onboarding-checks",
        table=[
            {"step": step["number"], "check": check["id"],
             "org": check["org"] or "deployment", "status": check["status"],
             "summary": check["summary"]}
            for step in result["steps"]
            for check in step["checks"]
        ],
        description="Every check of this onboarding run, by step",
    )


MARKS = {"pass": "[x]", "fail": "[ ]", "inconclusive": "[ ]", "not run": "[ ]"}


def render_checklist(result: dict) -> str:
    """Render the steps as a ticked checklist, with the failure and compensation."""
    org = result["org"] or {}
    lines = [
        f"# Onboarding: {result['outcome'].upper()}",
        "",
        f"Org `{org.get('org', 'not created')}` ({org.get('slug', '')}), "
        f"{org.get('outcome', 'no org')}; run `{result['flow_run_id']}`.",
        "",
        "## Steps",
        "",
    ]
    for step in result["steps"]:
        status = step["status"]
        lines.append(f"- {MARKS[status]} {step['number']}. {step['title']}: {status}")
        for check in step["checks"]:
            if status != "pass" or check["status"] != "pass":
                lines.append(f"  - {check['id']}: {check['status']}, "
                             f"{check['summary']}")
    if result["failure"]:
        failure = result["failure"]
        lines += ["", "## Failure", "",
                  f"Step {failure['step']} ({failure['step_title']}): "
                  f"{failure['error']}"]
    compensation = result["compensation"]
    if compensation:
        lines += ["", "## Compensation", "",
                  f"{compensation['status']}: {compensation['summary']}"]
    elif result["failure"]:
        lines += ["", "## Compensation", "", "No org was created or adopted, so "
                  "nothing was disabled."]
    if result["outcome"] == "onboarded":
        lines += ["", "Next: add the org id to UE_PILOT_ORG_IDS so that the hourly "
                  "audit covers it."]
    return "\n".join(lines)
