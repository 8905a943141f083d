"""Rollback: the runbook's "Rollback (Remove Pilot Org)" of one pilot org.

A run first builds a plan (org, members, active sessions, blobs to archive,
exports to take) and publishes it as the markdown artifact `rollback-plan`.
It then pauses until a person other than the requester approves it in the
Prefect UI's Resume form (or with `ue-pilot rollback --approve-as`), typing
the org id exactly. Only after that does it change anything, in the
runbook's order:

1. Notify the pilot org contact.
2. Export all of the org's data (the export-all flow, as a subflow).
3. Disable the org in Clerk: a status flag in its metadata and every active
   session of its members revoked. Memberships are kept as the audit trail.
4. Verify that no active session remains, in Clerk and in telemetry.
5. Archive the org's blobs to `archived/<org>/`.
6. Update the pilot status document.

Each finished step is recorded in `rollback/<org>/state.json`, so a new run
after a failed or killed one shows what is done, requests approval again and
continues with the first unfinished step. A run for an org that is disabled,
marked rolled back in the status document and has nothing but evidence
records left under `<org>/` reports "already rolled back" and changes nothing.

Every approved run, completed, failed at a step or interrupted (Ctrl-C,
SIGTERM), ends with an evidence record of the org (family "rollback"): the
approval and each step's outcome as checks, the plan, and the archive
manifest's sha256. Runs that change nothing (dry run, rejected or missing
approval, already rolled back) write none.

Run once: `ue-pilot rollback --org ORG --reason TEXT --approve-as NAME`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import ContainerClient
from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import FlowPauseTimeout, TerminationSignal
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from flows.export_all import export_all
from tasks.archive import ARCHIVE_ROOT, archive_blobs
from tasks.auth_events import sign_ins_since
from tasks.blob_storage import blob_url, open_container
from tasks.evidence import evidence_outcome, write_evidence_record
from tasks.identity import (
    STATUS_DISABLED,
    get_organization,
    list_active_sessions,
    list_members,
    open_clerk,
    org_status,
    revoke_sessions,
    sessions_left_for_org,
    set_org_status,
)
from tasks.notify import (
    NO_CONTACT_MESSAGE,
    NotificationError,
    notify_org_contact,
    webhook_url,
)
from tasks.paging import page_flow_crash
from tasks.status_doc import (
    ROLLBACK_IN_PROGRESS,
    STATUS_ROLLED_BACK,
    close_rollback_record,
    open_rollback_record,
    read_pilot_status,
    read_rollback_record,
    save_rollback_step,
    update_pilot_status,
)
from ue_pilot.checks import CheckResult, failed, inconclusive, passed
from ue_pilot.evidence_records import FAMILIES, HEAD_FILE, RECORD_FILE
from ue_pilot.orgids import InvalidOrgIdError, validate_org_id
from ue_pilot.redact import install_log_redaction, redact_text
from ue_pilot.results import flow_run_settings, key_results_by_run, result_storage
from ue_pilot.settings import Settings

ROLLBACK_FLOW = "rollback"
STEPS = ("notify", "export", "disable", "verify", "archive", "status")
STEP_TITLES = {
    "notify": "Notify the pilot org contact",
    "export": "Export all org data",
    "disable": "Disable the org in Clerk",
    "verify": "Verify no active sessions remain",
    "archive": "Archive blob storage artifacts",
    "status": "Update the pilot status document",
}
PLAN_ARTIFACT = "rollback-plan"
# Ends of a run that are not errors but still leave evidence: Ctrl-C and the
# SIGTERM that Prefect turns into TerminationSignal.
INTERRUPTIONS = (KeyboardInterrupt, TerminationSignal)
# Seconds between two reads of the paused run's state while waiting for approval.
APPROVAL_POLL_SECONDS = 2
MAX_TEXT_LENGTH = {"reason": 1000, "requested_by": 200}
MAX_MEMBERS_SHOWN = 50


class RollbackRequestError(ValueError):
    """The rollback request is incomplete: no reason or no requester."""


class UnknownOrgError(InvalidOrgIdError):
    """A valid org id that names no organization in Clerk."""


class ApprovalRejectedError(RuntimeError):
    """The approval did not match: wrong org id, no approver or the requester."""


class ApprovalTimeoutError(RuntimeError):
    """The approval timed out."""


class SessionsRemainError(RuntimeError):
    """Sessions of the disabled org still exist in Clerk or still sign in."""


class VerificationInconclusiveError(RuntimeError):
    """Telemetry could not show whether the org's sessions still sign in."""


class ApprovalInput(RunInput):
    """The Resume form of a paused rollback."""

    org_id: str = Field(
        title="Org id (type it exactly)",
        description="The id of the org to roll back, typed, not copied from the plan.",
    )
    approver: str = Field(
        title="Approver name",
        description="Your name. The person who requested the rollback cannot approve.",
    )
    comment: str = Field(title="Comment", description="Why you approve.")


# The request


def check_request(settings: Settings, org_id: object, reason: object,
                  requested_by: object) -> str:
    """Return the org id once the request is complete, before anything else runs.

    Raises InvalidOrgIdError for an id that is malformed or the start of a
    longer pilot org id, and RollbackRequestError for an empty reason or
    requester.
    """
    org = validate_org_id(org_id, settings.org_id_pattern)
    longer = sorted(o for o in settings.pilot_org_ids if o.startswith(org) and o != org)
    if longer and org not in settings.pilot_org_ids:
        raise InvalidOrgIdError(
            f"invalid org id {org!r}: it is not a pilot org but the start of "
            f"{', '.join(repr(o) for o in longer[:5])}; pass one exact org id"
        )
    for name, value in (("reason", reason), ("requested_by", requested_by)):
        if not isinstance(value, str) or not value.strip():
            raise RollbackRequestError(
                f"{name} is empty: give it as text; the status document and the "
                "evidence record it"
            )
        if len(value) > MAX_TEXT_LENGTH[name]:
            raise RollbackRequestError(
                f"{name} is {len(value)} characters long; the maximum is "
                f"{MAX_TEXT_LENGTH[name]}"
            )
    return org


def check_notify_setting(settings: Settings) -> None:
    """Raise RollbackRequestError when step 1 cannot notify, before the approval.

    A missing or invalid UE_NOTIFY_WEBHOOK_URL would otherwise fail the run
    only after a person approved it.
    """
    try:
        url = webhook_url(settings)
    except NotificationError as error:
        raise RollbackRequestError(str(error)) from None
    if not url and settings.notify_required:
        raise RollbackRequestError(NO_CONTACT_MESSAGE)


def find_organization(clerk, org: str):
    """Return the Clerk organization whose id is exactly `org`.

    Clerk's get-organization also matches a slug, so an organization with
    another id is rejected rather than rolled back.
    """
    organization = get_organization(clerk, org)
    if organization is None:
        raise UnknownOrgError(
            f"unknown org id {org!r}: Clerk has no organization with this id; "
            "check the id in the Clerk dashboard"
        )
    if organization.id != org:
        raise UnknownOrgError(
            f"invalid org id {org!r}: Clerk matched it as the slug of organization "
            f"{organization.id!r}; pass the org id, not its slug"
        )
    return organization


# The plan


def summarize_blobs(container: ContainerClient, prefix: str) -> dict:
    """Count the blobs and bytes under `prefix`, zero in a missing container.

    `evidence_records` counts the blobs of the evidence chain among them.
    """
    count = size = evidence = 0
    try:
        for blob in container.list_blobs(name_starts_with=prefix):
            count += 1
            size += blob.size or 0
            evidence += is_evidence_blob(blob.name, prefix)
    except ResourceNotFoundError:
        pass
    return {"prefix": prefix, "count": count, "bytes": size,
            "evidence_records": evidence}


def is_evidence_blob(name: str, prefix: str) -> bool:
    """Return True for an evidence record or the evidence chain's head under `prefix`.

    Flows that run after an archive (this rollback's own evidence record, an
    hourly audit) append to the org's chain under `<org>/` again, so these
    blobs do not mean that the archive left something behind.
    """
    relative = name[len(prefix):]
    if relative == HEAD_FILE:
        return True
    families = "|".join(re.escape(family) for family in FAMILIES)
    pattern = rf"(?:{families})/\d{{4}}/\d{{2}}/[^/]+/{re.escape(RECORD_FILE)}"
    return re.fullmatch(pattern, relative) is not None


def retry_unless(*errors: type[BaseException]):
    """Build a retry condition that retries every failure but one of `errors`."""

    def condition(task_object, task_run, state) -> bool:
        try:
            error = state.result(raise_on_failure=False)
        except Exception:  # an unreadable state is worth a retry
            return True
        return not isinstance(error, errors)

    return condition


@task(
    name="build-plan",
    retries=2,
    retry_delay_seconds=[5, 20],
    retry_condition_fn=retry_unless(InvalidOrgIdError),
    cache_policy=NO_CACHE,
)
def build_plan(settings: Settings, org: str) -> dict:
    """Read what the rollback would change, changing nothing."""
    clerk = open_clerk(settings)
    organization = find_organization(clerk, org)
    members = list_members(clerk, org)
    sessions = list_active_sessions(clerk, [m["user_id"] for m in members])
    container = open_container(settings, create=False)
    blobs = summarize_blobs(container, f"{org}/")
    pilot_status = read_pilot_status(settings, org)
    record = read_rollback_record(settings, org)

    clerk_status = org_status(settings, organization)["status"]
    in_progress = record is not None and record.get("state") == ROLLBACK_IN_PROGRESS
    already = (
        clerk_status == STATUS_DISABLED
        and (pilot_status or {}).get("status") == STATUS_ROLLED_BACK
        and blobs["count"] == blobs["evidence_records"]
        and not in_progress
    )
    return {
        "org": org,
        "org_name": organization.name,
        "clerk_status": clerk_status,
        "members": members,
        "active_sessions": sessions,
        "blobs": blobs,
        "archived": summarize_blobs(container, f"{ARCHIVE_ROOT}/{org}/"),
        "exports": list(settings.export_routes()),
        "pilot_status": pilot_status,
        "rollback": record if in_progress else None,
        "already_rolled_back": already,
        "container": settings.blob_container,
        "status_blob": settings.pilot_status_blob,
        "approval_timeout_seconds": settings.rollback_approval_timeout_seconds,
    }


def render_plan(plan: dict, reason: str, requested_by: str) -> str:
    """Render the plan as the markdown the approver reads."""
    org, blobs = plan["org"], plan["blobs"]
    lines = [
        f"# Rollback plan: {org} ({plan['org_name']})",
        "",
        f"Requested by **{requested_by}**. Reason: {reason}",
        "",
    ]
    if plan["already_rolled_back"]:
        return "\n".join(lines + [
            "**Already rolled back**: the org is disabled in Clerk, the pilot "
            "status document says rolled back and nothing but evidence records "
            f"is left under `{org}/`. Nothing will be changed.",
        ])
    lines += [
        "| What | Now |",
        "|---|---|",
        f"| Clerk status | {plan['clerk_status']} |",
        f"| Members (kept) | {len(plan['members'])} |",
        f"| Active sessions of members | {len(plan['active_sessions'])} |",
        f"| Blobs to archive | {blobs['count']} ({blobs['bytes']:,} bytes) under "
        f"`{org}/` |",
        f"| Already archived | {plan['archived']['count']} under "
        f"`{plan['archived']['prefix']}` |",
        f"| Exports to take | {', '.join(plan['exports'])} |",
        f"| Pilot status document | `{plan['status_blob']}`: "
        f"{(plan['pilot_status'] or {}).get('status', 'no entry')} |",
        "",
        *render_disabled_warning(plan),
        *render_progress(plan["rollback"]),
        "## Steps, in the runbook's order",
        "",
        *render_steps(plan),
        "",
        *render_members(plan),
        "## Approve",
        "",
        "Type the org id exactly, your name and a comment. The requester cannot "
        f"approve. Without approval within {plan['approval_timeout_seconds']} s the "
        "run fails and nothing is changed.",
    ]
    return "\n".join(lines)


def render_disabled_warning(plan: dict) -> list[str]:
    """Return a warning when the org is already disabled, which can fail the export.

    A failed onboarding disables its org in Clerk. A UE that honours the flag,
    as the sandbox does, rejects the org's sessions. Step 2 then fails, before
    the rollback changes Clerk or storage.
    """
    if plan["clerk_status"] != STATUS_DISABLED or plan["rollback"] is not None:
        return []
    return [
        "**The org is already disabled in Clerk** (a failed onboarding does "
        "this). If UE rejects its sessions, step 2 (export) fails and the "
        "rollback stops with nothing else changed. To export, set the org's "
        "status flag back to active in Clerk for the rollback's run; step 3 "
        "disables it again.",
        "",
    ]


def render_progress(record: dict | None) -> list[str]:
    if record is None:
        return []
    done = [step for step in STEPS if step in record["steps"]]
    return [
        f"**Continues rollback `{record['rollback_id']}`**, started "
        f"{record['started']}: done so far: {', '.join(done) or 'nothing'}. "
        "Done steps are skipped.",
        "",
    ]


def render_steps(plan: dict) -> list[str]:
    org, sessions = plan["org"], plan["active_sessions"]
    return [
        f"1. {STEP_TITLES['notify']} (webhook).",
        f"2. {STEP_TITLES['export']}: {', '.join(plan['exports'])}.",
        f"3. {STEP_TITLES['disable']}: status flag `disabled` in its metadata, "
        f"revoke {len(sessions)} active session(s); memberships stay.",
        f"4. {STEP_TITLES['verify']}: Clerk, and `auth_success` telemetry since "
        "the disable.",
        f"5. {STEP_TITLES['archive']}: `{org}/` to `{ARCHIVE_ROOT}/{org}/` in "
        f"container `{plan['container']}`.",
        f"6. {STEP_TITLES['status']}: `{plan['status_blob']}`, org marked "
        f"`{STATUS_ROLLED_BACK}`.",
    ]


def render_members(plan: dict) -> list[str]:
    sessions_by_user: dict[str, int] = {}
    for session in plan["active_sessions"]:
        user = session["user_id"]
        sessions_by_user[user] = sessions_by_user.get(user, 0) + 1
    lines = ["## Members", "", "| User | Role | Identifier | Active sessions |",
             "|---|---|---|---|"]
    for member in plan["members"][:MAX_MEMBERS_SHOWN]:
        lines.append(
            f"| {member['user_id']} | {member['role']} | {member['identifier']} | "
            f"{sessions_by_user.get(member['user_id'], 0)} |"
        )
    hidden = len(plan["members"]) - MAX_MEMBERS_SHOWN
    if hidden > 0:
        lines.append(f"| ... and {hidden} more | | | |")
    return lines + [""]


# The approval


def wait_for_approval(settings: Settings, org: str, plan_markdown: str,
                      requested_by: str) -> dict:
    """Pause for the approval form and return the approval once it matches.

    Raises ApprovalTimeoutError when no one resumes the run in time, and
    ApprovalRejectedError when the input does not match. Nothing has been
    changed in either case. The `rollback-approval` artifact records the
    outcome either way.
    """
    timeout = settings.rollback_approval_timeout_seconds
    form = ApprovalInput.with_initial_data(description=plan_markdown)
    try:
        submitted = pause_flow_run(
            wait_for_input=form, timeout=timeout, poll_interval=APPROVAL_POLL_SECONDS
        )
    except FlowPauseTimeout:
        # NOTE: the Prefect server then fails the run with its own message, "The
        # flow was failed and never resumed.", so this text reaches the run's
        # log and its approval artifact but not its state message.
        message = (f"approval timed out after {timeout} s; nothing was changed. "
                   "Start a new run to ask again")
        publish_approval(org, f"# Rollback of {org} not approved", [message])
        raise ApprovalTimeoutError(message) from None

    approval = {
        "approver": submitted.approver.strip(),
        "comment": submitted.comment,
        "typed_org_id": submitted.org_id,
        "approved_at": datetime.now(UTC).isoformat(),
    }
    details = [
        f"Approver: **{approval['approver']}**",
        f"At: {approval['approved_at']}",
        f"Requested by: {requested_by}",
        f"Org id typed: `{approval['typed_org_id']}`",
        f"Comment: {approval['comment']}",
    ]
    problems = approval_problems(submitted, org, requested_by)
    if problems:
        message = (f"approval rejected: {'; '.join(problems)}. Nothing was changed; "
                   "start a new run and have another person approve it")
        publish_approval(org, f"# Rollback of {org} rejected", [message, *details])
        raise ApprovalRejectedError(message)
    publish_approval(org, f"# Rollback of {org} approved", details)
    return approval


def approval_problems(
    submitted: ApprovalInput, org: str, requested_by: str
) -> list[str]:
    """Return why the approval does not count, an empty list when it does."""
    problems = []
    if submitted.org_id != org:
        problems.append(f"the typed org id {submitted.org_id!r} is not {org!r}")
    approver = submitted.approver.strip()
    if not approver:
        problems.append("the approver name is empty")
    elif approver.casefold() == requested_by.strip().casefold():
        problems.append(
            f"{approver!r} requested the rollback and cannot also approve it"
        )
    return problems


def publish_approval(org: str, heading: str, lines: list[str]) -> None:
    create_markdown_artifact(
        key="rollback-approval",
        markdown="\n".join([heading, "", *(f"- {line}" for line in lines)]),
        description=f"Who approved the rollback of {org}, when and why",
    )


# The steps


def export_org(settings: Settings, org: str) -> dict:
    """Run export-all as a subflow, whose failure raises and stops the rollback."""
    manifest = export_all(org_id=org)
    return {
        "manifest_blob": manifest["manifest_blob"]["blob"],
        "folder": manifest["folder"],
        "run_id": manifest["run_id"],
        "exports": [
            {key: entry[key] for key in ("name", "rows", "bytes", "sha256")}
            for entry in manifest["exports"]
        ],
    }


def export_still_stored(settings: Settings, outcome: dict) -> bool:
    """Return True when the recorded export manifest exists, archived or not."""
    container = open_container(settings, create=False)
    name = outcome["manifest_blob"]
    return any(
        container.get_blob_client(candidate).exists()
        for candidate in (name, f"{ARCHIVE_ROOT}/{name}")
    )


@task(
    name="disable-org",
    retries=2,
    retry_delay_seconds=[5, 20],
    retry_condition_fn=retry_unless(InvalidOrgIdError),
    cache_policy=NO_CACHE,
)
def disable_org(settings: Settings, org: str, details: dict) -> dict:
    """Flag the org disabled in Clerk and revoke every active session of its members.

    Every session of a member is revoked, not only those last used in this org,
    because a Clerk session can switch its active org without a new sign-in.
    `details` must contain the rollback id. An org that this rollback already
    flagged (a retried or continued step) keeps its disable time, which the
    verify step counts sign-ins from. The flag and details of anything else,
    such as a failed onboarding, are replaced, so that onboarding can never
    reopen a rolled-back org.

    NOTE: Clerk's changelog of 2026-11-06 states that a revoked session's current
    token stays valid until it expires, so UE must also honour the status flag.
    """
    logger = get_run_logger()
    clerk = open_clerk(settings)
    organization = find_organization(clerk, org)
    status = org_status(settings, organization)
    newly_disabled = not (
        status["status"] == STATUS_DISABLED
        and status.get("rollback_id") == details["rollback_id"]
    )
    if newly_disabled:
        replaced = rollback_status_details(status, details)
        status = set_org_status(settings, clerk, org, STATUS_DISABLED, replaced)
    disabled_at = status.get("changed_at") or datetime.now(UTC).isoformat()

    members = list_members(clerk, org)
    sessions = list_active_sessions(clerk, [m["user_id"] for m in members])
    revoked = revoke_sessions(clerk, [s["id"] for s in sessions])
    logger.info(
        "org %s: %s in Clerk at %s, %d of %d active session(s) of %d member(s) "
        "revoked, memberships kept",
        org, "disabled" if newly_disabled else "already disabled", disabled_at,
        len(revoked), len(sessions), len(members),
    )
    return {
        "disabled_at": disabled_at,
        "already_disabled": not newly_disabled,
        "members_kept": len(members),
        "sessions_revoked": revoked,
    }


def rollback_status_details(status: dict, details: dict) -> dict:
    """Return the rollback's status details, replacing those of the previous status.

    Clerk's merge-metadata endpoint (`PATCH /v1/organizations/{id}/metadata`)
    deep-merges and removes a key set to null, so every earlier detail (a failed
    onboarding's step and error, for one) is set to null, and `replaced` keeps
    who set the previous status and when.
    """
    stale = {key: None for key in status if key not in ("status", "changed_at")}
    replaced = {key: status[key] for key in ("status", "flow", "run_id", "changed_at")
                if status.get(key) is not None}
    return stale | {"flow": ROLLBACK_FLOW, **details, "replaced": replaced}


@task(
    name="verify-no-sessions",
    retries=2,
    retry_delay_seconds=[5, 20],
    # A verdict is final; only a failure to reach one is worth a retry.
    retry_condition_fn=retry_unless(SessionsRemainError, VerificationInconclusiveError),
    cache_policy=NO_CACHE,
)
def verify_no_sessions(settings: Settings, org: str, disabled_at: str) -> dict:
    """Prove that no session of the org remains, in Clerk and in telemetry.

    Raises SessionsRemainError listing what remains, and
    VerificationInconclusiveError when telemetry cannot show it either way.
    """
    logger = get_run_logger()
    since = datetime.fromisoformat(disabled_at)
    clerk = open_clerk(settings)
    members = list_members(clerk, org)
    sessions = list_active_sessions(clerk, [m["user_id"] for m in members])
    left = sessions_left_for_org(sessions, org, since)
    if left:
        listed = ", ".join(f"{s['id']} (user {s['user_id']})" for s in left[:20])
        raise SessionsRemainError(
            f"{len(left)} active Clerk session(s) of {org} remain after the disable "
            f"at {disabled_at}: {listed}. Revoke them in the Clerk dashboard, then "
            "run the rollback again"
        )
    logger.info("org %s: no active Clerk session remains", org)

    evidence = sign_ins_since(settings, org, since)
    if evidence.status == "found":
        listed = ", ".join(
            f"{u['user_id']} ({u['events']}, last {u['last_seen']})"
            for u in evidence.users[:20]
        )
        raise SessionsRemainError(
            f"telemetry shows auth_success events of {org} after the disable at "
            f"{disabled_at}: {listed}. Find how these users still sign in, then run "
            "the rollback again"
        )
    if evidence.status != "none":
        raise VerificationInconclusiveError(
            f"cannot verify that no session of {org} still signs in: "
            f"{evidence.problem}. Nothing after the disable was changed; run the "
            "rollback again once telemetry arrives"
        )
    logger.info(
        "org %s: no auth_success since %s (telemetry up to %s)",
        org, disabled_at, evidence.newest_telemetry,
    )
    return {
        "clerk_sessions_left": 0,
        "members_checked": len(members),
        "telemetry": evidence.to_dict(),
    }


class StepRunner:
    """Runs the rollback steps, skipping those the rollback record shows done.

    Each outcome is saved to the record as soon as its step finishes, and the
    `rollback-steps` table artifact lists every step's outcome, even when one
    fails.
    """

    def __init__(self, settings: Settings, org: str, record: dict) -> None:
        self.settings = settings
        self.org = org
        self.record = record
        self.rollback_id = record["rollback_id"]
        self.outcomes: dict[str, dict] = {}

    def run(self, step: str, action, *args) -> dict:
        """Run one step, or return its recorded outcome when it is already done."""
        logger = get_run_logger()
        done = self.record["steps"].get(step)
        if done is not None and self.still_done(step, done):
            logger.info("org %s: step %s done earlier, skipped", self.org, step)
            self.outcomes[step] = {"outcome": "skipped", "result": done}
            return done
        try:
            result = action(*args)
        except (Exception, *INTERRUPTIONS) as error:
            message = redact_text(str(error), self.settings.secret_values())
            self.outcomes[step] = {"outcome": "failed", "error": message,
                                   "error_type": type(error).__name__}
            self.publish()
            raise
        self.record = save_rollback_step(
            self.settings, self.org, self.rollback_id, step, result
        )
        self.outcomes[step] = {"outcome": "done", "result": result}
        return result

    def still_done(self, step: str, done: dict) -> bool:
        if step == "export":
            return export_still_stored(self.settings, done)
        return True

    def rows(self) -> list[dict]:
        rows = []
        for number, step in enumerate(STEPS, start=1):
            outcome = self.outcomes.get(step, {"outcome": "not run"})
            detail = outcome.get("error") or summarize_step(
                step, outcome.get("result")
            )
            rows.append({"step": f"{number}. {STEP_TITLES[step]}",
                         "outcome": outcome["outcome"], "detail": detail})
        return rows

    def publish(self) -> None:
        create_table_artifact(
            key="rollback-steps",
            table=self.rows(),
            description=f"Steps of rollback {self.rollback_id} of {self.org}",
        )


def summarize_step(step: str, result: dict | None) -> str:
    """Return one line about a step's result for the steps table."""
    if not result:
        return ""
    if step == "notify":
        return result.get("reason") or f"HTTP {result.get('http_status')}"
    if step == "export":
        return f"manifest {result['manifest_blob']}"
    if step == "disable":
        return (f"disabled at {result['disabled_at']}, "
                f"{len(result['sessions_revoked'])} session(s) revoked")
    if step == "verify":
        return ("no Clerk session; no auth_success since the disable (telemetry up "
                f"to {result['telemetry']['newest_telemetry']})")
    if step == "archive":
        manifest = result.get("manifest") or {}
        return (f"{result['archived_blobs']} blob(s) under {result['archive_prefix']}, "
                f"manifest {manifest.get('blob')}")
    return f"{result['blob']} etag {result['etag']}"


# The flow


@flow(
    name="rollback",
    description="Roll back one pilot org after a second person approves the plan: "
    "notify, export, disable in Clerk, verify no sessions, archive blobs, update "
    "the pilot status document.",
    persist_result=True,
    result_storage=result_storage(),
    result_serializer="json",
    timeout_seconds=flow_run_settings().rollback_timeout_seconds,
    on_failure=[page_flow_crash],
    on_crashed=[page_flow_crash],
)
def rollback(
    org_id: str, reason: str, requested_by: str, dry_run: bool = False
) -> dict:
    """Roll back one pilot org and return what each step did.

    Args:
        org_id: Clerk organization id of the pilot org to roll back.
        reason: Why the org is rolled back; the status document records it.
        requested_by: Name of the person asking for the rollback. Another person
            must approve it.
        dry_run: Only build and show the plan, changing nothing.
    """
    key_results_by_run()
    settings = Settings()
    install_log_redaction(settings.secret_values())
    org = check_request(settings, org_id, reason, requested_by)
    if not dry_run:
        check_notify_setting(settings)
    run_id = str(runtime.flow_run.id)

    # Plan
    plan = build_plan(settings, org)
    markdown = render_plan(plan, reason, requested_by)
    create_markdown_artifact(
        key=PLAN_ARTIFACT, markdown=markdown, description=f"Rollback plan of {org}"
    )
    if plan["already_rolled_back"]:
        return unchanged_result(plan, markdown, "already-rolled-back", run_id,
                                f"{org} is already rolled back; nothing was changed")
    if dry_run:
        return unchanged_result(plan, markdown, "dry-run", run_id,
                                f"dry run: plan of {org} shown, nothing was changed")

    # Approval
    approval = wait_for_approval(settings, org, markdown, requested_by)
    record = open_rollback_record(settings, org, {
        "run_id": run_id, "reason": reason.strip(),
        "requested_by": requested_by.strip(), **approval,
    })
    rollback_id = record["rollback_id"]
    steps = StepRunner(settings, org, record)

    try:
        # 1. Notify
        notice = build_notice(plan, record, approval, run_id)
        steps.run("notify", notify_org_contact, settings, notice,
                  f"{rollback_id}-notify")
        # 2. Export
        steps.run("export", export_org, settings, org)
        # 3. Disable
        disabled = steps.run("disable", disable_org, settings, org,
                             {"rollback_id": rollback_id, "run_id": run_id})
        # 4. Verify
        steps.run("verify", verify_no_sessions, settings, org,
                  disabled["disabled_at"])
        # 5. Archive
        archive = steps.run("archive", archive_blobs, settings, org)
        # 6. Update status
        status = steps.run("status", update_pilot_status, settings, {
            "org": org, "status": STATUS_ROLLED_BACK,
            "time": datetime.now(UTC).isoformat(), "run_id": run_id,
            "rollback_id": rollback_id, "approver": approval["approver"],
            "reason": record["reason"],
        })
        close_rollback_record(settings, org, rollback_id)
    except (Exception, *INTERRUPTIONS) as error:
        # The failure is evidence too, and so is an interrupt (Ctrl-C, SIGTERM)
        # or a timeout. record_rollback returns its own errors, so the step's
        # error is what ends the run.
        record_rollback(settings, steps, plan, approval, error)
        raise

    steps.publish()
    publish_archive_manifest(settings, archive)
    evidence = record_rollback(settings, steps, plan, approval)
    result = {
        "org": org, "outcome": STATUS_ROLLED_BACK, "run_id": run_id,
        "rollback_id": rollback_id,
        "message": (f"{org} rolled back (rollback {rollback_id}). Remove it from "
                    "UE_PILOT_ORG_IDS: the hourly audit would find its sessions "
                    "rejected and report inconclusive"),
        "reason": record["reason"], "requested_by": record["requested_by"],
        "plan": plan, "plan_markdown": markdown, "approval": approval,
        "steps": steps.rows(),
        "archive": archive, "status_document": status, "evidence": evidence,
    }
    get_run_logger().info(result["message"])
    return result


def unchanged_result(plan: dict, markdown: str, outcome: str, run_id: str,
                     message: str) -> dict:
    get_run_logger().info(message)
    return {
        "org": plan["org"], "outcome": outcome, "run_id": run_id,
        "rollback_id": None, "message": message, "plan": plan,
        "plan_markdown": markdown, "approval": None, "steps": [], "archive": None,
        "status_document": None, "evidence": None,
    }


def build_notice(plan: dict, record: dict, approval: dict, run_id: str) -> dict:
    """Return the JSON notice telling the org contact that the rollback proceeds."""
    org = plan["org"]
    return {
        "event": "ue-pilot.rollback.proceeding",
        "org": org,
        "org_name": plan["org_name"],
        "text": (f"The Union-Eyes pilot of {plan['org_name']} ({org}) is being "
                 f"rolled back: {record['reason']}. Its data is exported before "
                 "access is disabled."),
        "reason": record["reason"],
        "requested_by": record["requested_by"],
        "approved_by": approval["approver"],
        "rollback_id": record["rollback_id"],
        "run_id": run_id,
        "time": datetime.now(UTC).isoformat(),
    }


def publish_archive_manifest(settings: Settings, archive: dict) -> None:
    """Link the archive manifest blob, the proof of what was moved."""
    manifest = archive.get("manifest")
    if not manifest:
        return
    container = open_container(settings, create=False)
    create_link_artifact(
        key="rollback-archive-manifest",
        link=blob_url(container, manifest["blob"]),
        link_text=manifest["blob"],
        description=f"{manifest['blobs']} blob(s), {manifest['bytes']} bytes, "
        f"sha256 {manifest['sha256']}",
    )



# Evidence

# Check ids of the steps in the rollback's evidence record.
STEP_CHECKS = {
    "notify": "rollback.notify",
    "export": "rollback.export",
    "disable": "rollback.disable",
    "verify": "rollback.sessions",
    "archive": "rollback.archive",
    "status": "rollback.status_document",
}
APPROVAL_CHECK = "rollback.approval"


def record_rollback(
    settings: Settings,
    steps: StepRunner,
    plan: dict,
    approval: dict,
    error: BaseException | None = None,
) -> dict:
    """Write the org's evidence record of this approved rollback, failed or not.

    Returns the outcome of `write_evidence_record`, or `{"error": ...}`. Every
    Exception is logged and returned instead of raised, so a record that cannot
    be built or written never takes the place of the rollback's own outcome.
    """
    org = steps.org
    try:
        checks = [approval_check(org, approval, steps.record["requested_by"])]
        checks += [step_check(org, step, steps.outcomes.get(step)) for step in STEPS]
        entry = {
            "checks": checks,
            "target": rollback_target(settings, steps, plan, approval, error),
            "artifacts": archive_artifacts(steps.outcomes.get("archive")),
        }
        state = write_evidence_record(
            settings, "rollback", {org: entry}, return_state=True
        )
        return evidence_outcome(state)
    except Exception as problem:
        # Any error, a bug included, is reported here and not raised.
        message = redact_text(f"{type(problem).__name__}: {problem}",
                              settings.secret_values())[:500]
        get_run_logger().error("evidence record of the rollback of %s not written: "
                               "%s", org, message)
        return {"error": message}


def approval_check(org: str, approval: dict, requested_by: str) -> CheckResult:
    return passed(
        APPROVAL_CHECK,
        f"approved by {approval['approver']} at {approval['approved_at']}, "
        f"requested by {requested_by}",
        org,
        requested_by=requested_by,
        **approval,
    )


def step_check(org: str, step: str, outcome: dict | None) -> CheckResult:
    """Return the check of one step: pass only when the step's work is done.

    A step that did not run, a notice not sent because no contact is
    configured, and a verify step that telemetry could not decide are
    inconclusive.
    """
    check_id = STEP_CHECKS[step]
    if outcome is None:
        return inconclusive(check_id, "not run: the rollback stopped before this "
                            "step", org)
    if outcome["outcome"] == "failed":
        if outcome["error_type"] == VerificationInconclusiveError.__name__:
            return inconclusive(check_id, outcome["error"], org)
        return failed(check_id, outcome["error"], org, error_type=outcome["error_type"])
    result = outcome["result"]
    done_by = "this run" if outcome["outcome"] == "done" else "an earlier run"
    if step == "notify" and result.get("outcome") == "skipped":
        return inconclusive(check_id, f"notice not sent: {result.get('reason')} "
                            "(UE_NOTIFY_REQUIRED=false)", org, done_by=done_by,
                            result=result)
    summary = f"{summarize_step(step, result)} (by {done_by})"
    return passed(check_id, summary, org, done_by=done_by, result=result)


def rollback_target(
    settings: Settings,
    steps: StepRunner,
    plan: dict,
    approval: dict,
    error: BaseException | None,
) -> dict:
    """Describe what the rollback acted on: the request, the plan and the outcome."""
    failure = None
    if error is not None:
        failure = redact_text(f"{type(error).__name__}: {error}",
                              settings.secret_values())[:1000]
    return {
        "base_url": settings.base_url,
        "org": steps.org,
        "rollback_id": steps.rollback_id,
        "outcome": "failed" if error is not None else STATUS_ROLLED_BACK,
        "failure": failure,
        "reason": steps.record["reason"],
        "requested_by": steps.record["requested_by"],
        "approval": approval,
        "plan": plan,
    }


def archive_artifacts(outcome: dict | None) -> dict:
    """Return the archive manifest blob with its sha256, once the archive finished."""
    if outcome is None or outcome["outcome"] == "failed":
        return {}
    manifest = outcome["result"].get("manifest")
    if not manifest:
        return {}
    return {"archive_manifest": {"blob": manifest["blob"],
                                 "sha256": manifest["sha256"]}}
