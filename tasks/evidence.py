"""Evidence in the run history: the runbook's Verification checklist, a table of
every check, and the result the flow persists as JSON. Evidence in Blob
Storage: one hash-chained record per org and flow run (`write_evidence_record`).

Artifacts carry check ids, statuses and summaries only: no secret, no token
and no exported row ever reaches them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from uuid import UUID

from azure.core.exceptions import AzureError
from azure.storage.blob import ContainerClient
from prefect import get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.states import State

from tasks.blob_storage import StorageUnavailableError, open_container
from ue_pilot.checks import CheckResult, Status
from ue_pilot.evidence_records import (
    TRIGGERS,
    EvidenceError,
    append_record,
    blob_sha256,
    build_body,
    check_entry,
    classify_trigger,
    record_name,
    validate_family,
)
from ue_pilot.orgids import validate_org_id
from ue_pilot.settings import Settings

# The runbook's Verification checklist and the check ids that prove each line.
# Lines the hourly audit cannot prove stay unticked with a reason.
VERIFICATION = [
    (
        "Pilot org can log in and access their data only",
        (
            "access.export_allows_own_org",
            "access.export_rows_belong_to_org",
            "access.export_rejects_other_org",
            "access.probe_sessions",
        ),
    ),
    (
        "Cross-org analytics requires admin role",
        (
            "access.cross_org_requires_auth",
            "access.cross_org_requires_role",
            "access.cross_org_allows_min_role",
        ),
    ),
    (
        "Export routes return 401 without auth",
        ("access.export_requires_auth", "access.auth_bypass"),
    ),
    (
        "RLS context is set correctly for all queries",
        (
            "rls.context_readback",
            "rls.cross_org_rows",
            "rls.fail_open",
            "rls.pool_reuse",
            "rls.enabled_forced",
            "rls.policies_present",
            "rls.always_true_policy",
            "rls.views_security_invoker",
            "rls.app_role",
            "rls.default_context",
        ),
    ),
    (
        "No cross-org data leakage in query logs",
        (
            "telemetry.liveness",
            "telemetry.cross_org_events",
            "monitor.ue_rls_context_mismatch",
        ),
    ),
    ("Monitoring alerts fire on test trigger", ()),
    ("Rollback procedure tested in staging", ()),
]
NOT_COVERED = "not proved by the hourly audit"
MARKS = {Status.PASS: "pass", Status.FAIL: "FAIL", Status.INCONCLUSIVE: "inconclusive"}


def checklist_lines(checks: list[CheckResult]) -> list[str]:
    lines = []
    for text, ids in VERIFICATION:
        related = [c for c in checks if c.id in ids]
        if not ids:
            lines.append(f"- [ ] {text}: {NOT_COVERED}")
            continue
        statuses = {c.status for c in related}
        if not related:
            lines.append(f"- [ ] {text}: no check ran")
        elif statuses == {Status.PASS}:
            lines.append(f"- [x] {text} ({len(related)} checks passed)")
        else:
            bad = sorted(
                {
                    f"{c.id} {MARKS[c.status]}"
                    for c in related
                    if c.status != Status.PASS
                }
            )
            lines.append(f"- [ ] {text}: " + "; ".join(bad))
    return lines


def render_report(
    verdict: Status,
    window: tuple[str, str],
    checks: list[CheckResult],
    target: dict[str, object],
) -> str:
    counts = {status: sum(1 for c in checks if c.status == status) for status in Status}
    lines = [
        f"# Isolation audit: {verdict.value.upper()}",
        "",
        f"Target: `{target.get('base_url')}`, {target.get('orgs')} org(s). "
        f"Telemetry window: {window[0]} to {window[1]}.",
        "",
        f"Checks: {counts[Status.PASS]} pass, {counts[Status.FAIL]} fail, "
        f"{counts[Status.INCONCLUSIVE]} inconclusive.",
        "",
        "## Verification",
        "",
        *checklist_lines(checks),
    ]
    problems = [c for c in checks if c.status != Status.PASS]
    if problems:
        lines += ["", "## Failed and inconclusive checks", ""]
        for check in problems[:200]:
            scope = check.org or "deployment"
            lines.append(
                f"- **{check.id}** ({scope}): {MARKS[check.status]}, {check.summary}"
            )
        if len(problems) > 200:
            lines.append(f"- ... and {len(problems) - 200} more in the checks table")
    return "\n".join(lines)


@task(name="publish-evidence", cache_policy=NO_CACHE)
def publish_evidence(
    verdict: Status,
    window: tuple[str, str],
    checks: list[CheckResult],
    target: dict[str, object],
) -> None:
    """Write the checklist and the checks table as artifacts of this run."""
    create_markdown_artifact(
        key="isolation-audit-report",
        markdown=render_report(verdict, window, checks, target),
        description="Runbook Verification checklist and the audit verdict",
    )
    create_table_artifact(
        key="isolation-audit-checks",
        table=[
            {
                "check": c.id,
                "org": c.org or "deployment",
                "status": c.status.value,
                "summary": c.summary,
            }
            for c in checks
        ],
        description="Every check of this audit run",
    )


# Per-org records are written by this many threads inside the one task run, so
# the number of task runs stays one whatever the number of orgs.
EVIDENCE_WORKERS = 16
NO_STORAGE = (
    "no Blob Storage configured: set UE_BLOB_CONNECTION_STRING or UE_BLOB_ACCOUNT_URL"
)


class EvidenceWriteError(RuntimeError):
    """The records of some orgs could not be written; those of the others were."""


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry storage trouble, but not an invalid org, family or check."""
    try:
        state.result()
    except ValueError:
        return False
    except Exception:
        return True
    return True


@task(
    name="write-evidence-record",
    retries=2,
    retry_delay_seconds=[5, 15],
    retry_condition_fn=retry_unless_bad_input,
    cache_policy=NO_CACHE,
)
def write_evidence_record(
    settings: Settings,
    family: str,
    records_by_org: dict[str, dict],
    trigger: str | None = None,
) -> dict:
    """Write one evidence record per org for this flow run, chained to the org's
    previous record, at `<org>/<family>/<yyyy>/<mm>/<run-id>/record.json`.

    Args:
        settings: The run's settings. Records carry `public_view()` only, and
            every secret value is masked in every string they contain.
        family: "isolation-audit", "onboarding", "export" or "rollback".
        records_by_org: `{org id: {"checks": [...], "target": {...},
            "artifacts": {...}}}`. `checks` are CheckResult objects or their
            `to_dict()` form. `target` describes what was checked (base URL,
            export folder, ...). `artifacts` maps a name to `{"blob": name,
            "sha256": hex}` when the hash is known, or else to the blob name,
            which is then downloaded and hashed.
        trigger: "schedule", "operator", "automation" or "cli" to override
            what the flow run's metadata shows.

    Returns `{"family", "records": {org: {"record", "sequence", "sha256",
    "reused"}}}`, or `{"family", "skipped": reason}` when no Blob Storage is
    configured. A retry of the same flow run reuses the records it already
    wrote. Raises EvidenceWriteError naming the orgs whose record failed, after
    writing every other org's.
    """
    logger = get_run_logger()
    validate_family(family)
    if trigger is not None and trigger not in TRIGGERS:
        raise ValueError(
            f"invalid trigger {trigger!r}: expected one of {', '.join(TRIGGERS)}"
        )
    checks_by_org = validate_records(settings, records_by_org)
    if not storage_configured(settings):
        logger.warning("evidence records of %s not written: %s", family, NO_STORAGE)
        return {"family": family, "skipped": NO_STORAGE}

    container = open_container(settings)
    run, trigger_info, folder_time = describe_run(trigger)
    view = settings.public_view()
    secrets = settings.secret_values()
    # Only a repeated attempt can find its own record already stored.
    retried = runtime.task_run.run_count > 1 or runtime.flow_run.run_count > 1

    def write(org: str) -> dict:
        entry = records_by_org[org]
        body = build_body(
            org=org,
            family=family,
            name=record_name(org, family, run["flow_run_id"], folder_time),
            run=run,
            trigger=trigger_info,
            target=entry.get("target") or {},
            settings_view=view,
            checks=checks_by_org[org],
            artifacts=artifact_entries(container, entry.get("artifacts") or {}),
            secrets=secrets,
        )
        return append_record(container, org, body, retried=retried)

    written, errors = run_per_org(write, list(records_by_org))
    publish_record_table(family, written)
    logger.info(
        "%d %s evidence record(s) written, %d reused, %d failed (trigger %s)",
        sum(1 for r in written.values() if not r["reused"]),
        family,
        sum(1 for r in written.values() if r["reused"]),
        len(errors),
        trigger_info["kind"],
    )
    if errors:
        for org, error in list(errors.items())[:20]:
            logger.error("evidence record of %s not written: %s", org, error)
        raise EvidenceWriteError(
            f"{len(errors)} evidence record(s) of {family} not written, for "
            f"{sorted(errors)[:20]}; the other orgs' records were written"
        )
    return {"family": family, "records": written}


def validate_records(
    settings: Settings, records_by_org: dict[str, dict]
) -> dict[str, list[dict]]:
    """Check every org id and check before anything is written.

    Returns the checks of each org in the form a record stores them. A check
    shared by every org (a deployment-wide one) is converted once.
    """
    converted: dict[int, dict] = {}
    checks_by_org = {}
    for org, entry in records_by_org.items():
        validate_org_id(org, settings.org_id_pattern)
        checks = entry.get("checks") or []
        for check in checks:
            if id(check) not in converted:
                converted[id(check)] = check_entry(check)
        checks_by_org[org] = [converted[id(check)] for check in checks]
    return checks_by_org


def storage_configured(settings: Settings) -> bool:
    return bool(
        settings.blob_connection_string.get_secret_value() or settings.blob_account_url
    )


# Levels of subflows followed up. None of the flows nests this deep.
MAX_FLOW_DEPTH = 10


def outermost_flow_run(client, flow_run):
    """Return the flow run that started `flow_run` as a subflow, up to the top.

    A flow run without a parent task run is its own outermost run.
    """
    current = flow_run
    for _ in range(MAX_FLOW_DEPTH):
        if not current.parent_task_run_id:
            break
        parent_task = client.read_task_run(current.parent_task_run_id)
        if not parent_task.flow_run_id:
            break
        current = client.read_flow_run(parent_task.flow_run_id)
    return current


def describe_run(trigger: str | None) -> tuple[dict, dict, datetime]:
    """Return the flow run's identity, what triggered it, and its folder time.

    The folder time is the scheduled start, as for export folders, so a retry
    of the run writes to the same record name. A subflow, such as the export
    of a rollback, takes its trigger from the outermost flow run above it.
    """
    flow_run_id = runtime.flow_run.id
    if not flow_run_id:
        raise EvidenceError("write_evidence_record must run inside a flow run")
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(UUID(flow_run_id))
        root = outermost_flow_run(client, flow_run)
        deployment = (
            client.read_deployment(root.deployment_id) if root.deployment_id else None
        )
    now = datetime.now(UTC)
    created_by = root.created_by
    kind = trigger or classify_trigger(
        str(root.deployment_id) if root.deployment_id else None,
        root.auto_scheduled,
        created_by.type if created_by else None,
    )
    run = {
        "flow": runtime.flow_run.flow_name,
        "flow_run_id": flow_run_id,
        "flow_run_name": flow_run.name,
        "started": (flow_run.start_time or now).isoformat(),
        "run_count": flow_run.run_count,
    }
    trigger_info = {
        "kind": kind,
        "deployment": (
            {"id": str(deployment.id), "name": deployment.name} if deployment else None
        ),
        "created_by": (
            {"type": created_by.type, "name": created_by.display_value}
            if created_by
            else None
        ),
        "scheduled_start": (flow_run.expected_start_time or now).isoformat(),
        "tags": sorted(flow_run.tags),
    }
    if root.id != flow_run.id:
        trigger_info["parent_flow_run"] = {"id": str(root.id), "name": root.name}
    folder_time = runtime.flow_run.scheduled_start_time or now
    return run, trigger_info, folder_time


def artifact_entries(container: ContainerClient, artifacts: dict) -> list[dict]:
    """Return `[{"name", "blob", "sha256"}]`, hashing blobs given by name only."""
    entries = []
    for name, value in artifacts.items():
        blob = value if isinstance(value, str) else value["blob"]
        digest = None if isinstance(value, str) else value.get("sha256")
        digest = digest or blob_sha256(container, blob)
        entries.append({"name": name, "blob": blob, "sha256": digest})
    return entries


def run_per_org(write, orgs: list[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """Run `write(org)` for every org on a thread pool; return results and errors."""
    written, errors = {}, {}
    workers = max(1, min(EVIDENCE_WORKERS, len(orgs)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {org: pool.submit(write, org) for org in orgs}
    for org, future in futures.items():
        try:
            written[org] = future.result()
        except (AzureError, EvidenceError, StorageUnavailableError) as error:
            errors[org] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    return written, errors


def publish_record_table(family: str, written: dict[str, dict]) -> None:
    """Tabulate each org's record and sha256 in the run's artifacts.

    The run history then contains the hashes too, outside Blob Storage.
    """
    if not written:
        return
    create_table_artifact(
        key="evidence-records",
        table=[
            {
                "org": org,
                "sequence": result["sequence"],
                "record": result["record"],
                "sha256": result["sha256"],
                "reused": result["reused"],
            }
            for org, result in written.items()
        ],
        description=f"Evidence records of this {family} run in Blob Storage",
    )


def evidence_outcome(state: State) -> dict:
    """Return the task's result, or `{"error": ...}` when it failed.

    A flow calls this so that a failed evidence write is reported without
    changing the flow's own verdict.
    """
    value = state.result(raise_on_failure=False)
    if state.is_completed() and isinstance(value, dict):
        return value
    get_run_logger().error("evidence records not written: %r", value)
    return {"error": f"{type(value).__name__}: {value}"[:500]}
