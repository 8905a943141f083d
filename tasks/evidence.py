"""Evidence in the run history: the runbook's Verification checklist, a table of
every check, and the result the flow persists as JSON.

Artifacts carry check ids, statuses and summaries only: no secret, no token
and no exported row ever reaches them.
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from ue_pilot.checks import CheckResult, Status

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
