"""The hourly isolation audit: the runbook's diagnosis steps 1 to 4, its
Monitoring table and its Verification checklist, for every pilot org.

Each step is one task covering all orgs, so the number of task runs stays the
same whatever the number of orgs. A task that fails even after its retries
turns its checks inconclusive; the verdict never passes on missing proof.

Run once: `ue-pilot audit` (or `ue-pilot audit --sandbox`).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture

from deployments.catch_up import supersede_missed_runs
from tasks.database import (
    GLOBAL_CHECKS,
    POSTURE_CHECKS,
    check_db_connections,
    inspect_rls_posture,
    probe_rls_context,
)
from tasks.evidence import evidence_outcome, publish_evidence, write_evidence_record
from tasks.http_access import probe_access
from tasks.http_probes import probe_health
from tasks.logs import query_telemetry
from tasks.paging import escalate, page_flow_crash
from tasks.state import ping_redis, plan_window, record_window, register_probe_agent
from ue_pilot.checks import CheckResult, Status, inconclusive, verdict
from ue_pilot.orgids import validate_org_id
from ue_pilot.redact import install_log_redaction, redact_checks
from ue_pilot.results import flow_run_settings, key_results_by_run, result_storage
from ue_pilot.settings import Settings


class AuditConfigurationError(ValueError):
    """The audit cannot start: no orgs, or an org that is not a pilot org."""


def select_orgs(settings: Settings, orgs: list[str] | None) -> list[str]:
    """Return the orgs to audit: the requested ones, which must be pilot orgs."""
    if not settings.pilot_org_ids:
        raise AuditConfigurationError(
            "no pilot orgs configured: set UE_PILOT_ORG_IDS to a comma-separated "
            "list of Clerk org ids"
        )
    if not orgs:
        return list(settings.pilot_org_ids)
    for org in orgs:
        validate_org_id(org, settings.org_id_pattern)
        if org not in settings.pilot_org_ids:
            raise AuditConfigurationError(
                f"org {org!r} is not a pilot org; pilot orgs come from UE_PILOT_ORG_IDS"
            )
    return list(dict.fromkeys(orgs))


def gather(
    future: PrefectFuture, fallback_ids: tuple[str, ...], orgs: list[str] | None = None
) -> list[CheckResult]:
    """Return a task's checks, or inconclusive ones if the task itself failed."""
    future.wait()
    value = future.result(raise_on_failure=False)
    if isinstance(value, BaseException) or not future.state.is_completed():
        reason = f"task {future.task_run_id} did not complete: {value!r}"[:300]
        scopes = orgs if orgs else [None]
        return [
            inconclusive(check_id, reason, org)
            for check_id in fallback_ids
            for org in scopes
        ]
    return value if isinstance(value, list) else [value]


@flow(
    name="isolation-audit",
    description="Prove org isolation of the UE pilot: health, telemetry, monitors, "
    "auth gates and row-level security, for every pilot org.",
    persist_result=True,
    result_storage=result_storage(),
    result_serializer="json",
    timeout_seconds=flow_run_settings().audit_timeout_seconds,
    on_failure=[page_flow_crash],
    on_crashed=[page_flow_crash],
)
def isolation_audit(orgs: list[str] | None = None) -> dict:
    """Audit every pilot org (or `orgs`) and return the verdict and every check.

    Args:
        orgs: Clerk org ids of the pilot orgs to audit (default: every pilot org).
    """
    key_results_by_run()
    logger = get_run_logger()
    settings = Settings()
    secrets = settings.secret_values()
    install_log_redaction(secrets)
    orgs = select_orgs(settings, orgs)
    logger.info("auditing %d org(s) at %s", len(orgs), settings.base_url)

    # Catch-up: this run's window covers the slots missed during downtime.
    supersede_missed_runs()

    # Window
    window = plan_window(settings)
    agent, agents = register_probe_agent(settings)

    # Health, telemetry, access and RLS run side by side.
    futures = [
        (probe_health.submit(settings, agent), ("health.ready", "health.health"),
         None),
        (ping_redis.submit(settings), ("health.redis",), None),
        (check_db_connections.submit(settings), ("health.db_connections",), None),
        (query_telemetry.submit(settings, orgs, window, agents),
         ("telemetry.liveness",), None),
        (probe_access.submit(settings, orgs, agent), ("access.probe_sessions",), orgs),
        (inspect_rls_posture.submit(settings), POSTURE_CHECKS, None),
        (probe_rls_context.submit(settings, orgs), GLOBAL_CHECKS, None),
    ]
    # Library errors can quote a secret; nothing below may carry one.
    checks = redact_checks(
        [check for future, ids, scope in futures for check in gather(future, ids, scope)],
        secrets,
    )
    outcome = verdict(checks)

    # Escalate
    paging = escalate.submit(settings, checks).result()

    # Evidence
    window_text = (window[0].isoformat(), window[1].isoformat())
    target = {"base_url": settings.base_url, "orgs": len(orgs)}
    publish_evidence(outcome, window_text, checks, target)
    evidence = evidence_outcome(
        write_evidence_record(
            settings,
            "isolation-audit",
            evidence_by_org(orgs, checks, dict(target, window=window_text)),
            return_state=True,
        )
    )
    if all(
        c.status != Status.INCONCLUSIVE
        for c in checks
        if c.id.startswith(("telemetry.", "monitor."))
    ):
        record_window(settings, window[1])

    logger.info("verdict %s: %d checks", outcome.value, len(checks))
    return {
        "verdict": outcome.value,
        "window": {"start": window_text[0], "end": window_text[1]},
        "target": target,
        "paging": paging,
        "evidence": evidence,
        "checks": [check.to_dict() for check in checks],
    }


def evidence_by_org(
    orgs: list[str], checks: list[CheckResult], target: dict
) -> dict[str, dict]:
    """Group the checks into one evidence record per org.

    Deployment-wide checks (health, RLS posture) go into every org's record.
    """
    by_org = {org: {"checks": [], "target": dict(target, org=org)} for org in orgs}
    for check in checks:
        if check.org is None:
            for entry in by_org.values():
                entry["checks"].append(check)
        elif check.org in by_org:
            by_org[check.org]["checks"].append(check)
    return by_org
