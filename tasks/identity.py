"""Identity provider tasks: the flows' calls to Clerk through its Backend API SDK.

Clerk has no disable for an organization, so the pilot status lives in the
org's public metadata under `UE_CLERK_STATUS_KEY`, which UE honours. Nothing
here deletes an organization or a membership: they are the audit trail.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import httpx
from clerk_backend_api import Clerk, models
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction

from ue_pilot.checks import CheckResult, failed, inconclusive, passed
from ue_pilot.clients import build_clerk
from ue_pilot.settings import Settings

STATUS_ACTIVE = "active"
STATUS_DISABLED = "disabled"


class IdentityProviderError(RuntimeError):
    """Clerk rejected a request or could not be reached."""


def describe_clerk_error(error: Exception) -> str:
    """Return the status, Clerk error codes and messages of an SDK error."""
    if isinstance(error, models.ClerkErrors):
        codes = [f"{item.code}: {item.long_message or item.message}"
                 for item in error.data.errors]
        return f"HTTP {error.raw_response.status_code} ({'; '.join(codes)})"
    if isinstance(error, models.SDKError):
        return f"HTTP {error.status_code}: {error.message}"
    return f"{type(error).__name__}: {error}"


def open_clerk(settings: Settings) -> Clerk:
    """Build the Clerk client, failing early when no secret key is configured."""
    if not settings.clerk_secret_key.get_secret_value():
        raise IdentityProviderError(
            "UE_CLERK_SECRET_KEY is not set: give the Clerk secret key of the "
            "instance that holds the pilot orgs"
        )
    return build_clerk(settings)


def get_organization(clerk: Clerk, org_id: str) -> models.Organization | None:
    """Return the organization, or None when Clerk returns 404."""
    try:
        return clerk.organizations.get(organization_id=org_id)
    except models.ClerkErrors as error:
        if error.raw_response.status_code == 404:
            return None
        raise IdentityProviderError(
            f"Clerk lookup of org {org_id!r} failed: {describe_clerk_error(error)}"
        ) from error
    except models.SDKError as error:
        raise IdentityProviderError(
            f"Clerk lookup of org {org_id!r} failed: {describe_clerk_error(error)}"
        ) from error


def org_status(settings: Settings, organization: models.Organization) -> dict:
    """Return the org's pilot status record from its public metadata.

    An org without the key is active: that is every org before its first
    rollback or failed onboarding.
    """
    metadata = organization.public_metadata or {}
    status = metadata.get(settings.clerk_status_key)
    details = metadata.get(f"{settings.clerk_status_key}_details") or {}
    return {"status": status or STATUS_ACTIVE, **details}


def set_org_status(
    settings: Settings, clerk: Clerk, org_id: str, status: str, details: dict
) -> dict:
    """Merge the pilot status flag and its details into the org's public metadata.

    The merge leaves every other metadata key as it is, and writing the same
    status again changes nothing else, so a retried call is harmless.
    """
    record = {**details, "changed_at": datetime.now(UTC).isoformat()}
    metadata = {
        settings.clerk_status_key: status,
        f"{settings.clerk_status_key}_details": record,
    }
    try:
        clerk.organizations.merge_metadata(
            organization_id=org_id, public_metadata=metadata
        )
    except (models.ClerkErrors, models.SDKError) as error:
        raise IdentityProviderError(
            f"setting pilot status {status!r} on org {org_id!r} failed: "
            f"{describe_clerk_error(error)}"
        ) from error
    return {"org": org_id, "status": status, **record}


# Members and sessions, for the rollback's disable and verify steps.

# Clerk's list endpoints return at most 500 items a page.
PAGE_LIMIT = 500


def _clerk_call(action: str, call, **arguments):
    """Run one SDK call, turning its errors into IdentityProviderError."""
    try:
        return call(**arguments)
    except (models.ClerkErrors, models.SDKError) as error:
        raise IdentityProviderError(
            f"{action} failed: {describe_clerk_error(error)}"
        ) from error


def list_members(clerk: Clerk, org_id: str) -> list[dict]:
    """Return every member of the org as {user_id, role, identifier}, page by page."""
    members: list[dict] = []
    while True:
        page = _clerk_call(
            f"listing the members of org {org_id!r}",
            clerk.organization_memberships.list,
            organization_id=org_id,
            limit=PAGE_LIMIT,
            offset=len(members),
        )
        for membership in page.data:
            user = membership.public_user_data
            members.append({
                "user_id": user.user_id if user else "",
                "role": membership.role,
                "identifier": (user.identifier or "") if user else "",
            })
        if not page.data or len(members) >= page.total_count:
            return members


def list_active_sessions(clerk: Clerk, user_ids: list[str]) -> list[dict]:
    """Return the active sessions of the users, whatever org each was last used in.

    Clerk's session list has no org filter, so this sends one request per user. Each
    session is {id, user_id, last_active_organization_id, created_at} with
    `created_at` in milliseconds since the epoch, as Clerk gives it.
    """
    sessions: list[dict] = []
    for user_id in user_ids:
        offset = 0
        while True:
            page = _clerk_call(
                f"listing the active sessions of user {user_id!r}",
                clerk.sessions.list,
                user_id=user_id,
                status=models.QueryParamStatus.ACTIVE,
                limit=PAGE_LIMIT,
                offset=offset,
            )
            sessions += [_session_record(session) for session in page]
            if len(page) < PAGE_LIMIT:
                break
            offset += len(page)
    return sessions


def _session_record(session: models.Session) -> dict:
    org = session.last_active_organization_id
    return {
        "id": session.id,
        "user_id": session.user_id,
        "last_active_organization_id": org if isinstance(org, str) else None,
        "created_at": session.created_at,
    }


def revoke_sessions(clerk: Clerk, session_ids: list[str]) -> list[str]:
    """Revoke each session and return the ids Clerk reports revoked.

    Revoking a session that is already revoked or ended changes nothing, so a
    retried call is harmless.
    """
    revoked = []
    for session_id in session_ids:
        session = _clerk_call(
            f"revoking session {session_id!r}", clerk.sessions.revoke,
            session_id=session_id,
        )
        if session.status != models.Status.ACTIVE:
            revoked.append(session_id)
    return revoked


def sessions_left_for_org(
    sessions: list[dict], org_id: str, disabled_at: datetime
) -> list[dict]:
    """Return the active sessions that can still reach the disabled org.

    A session counts when it was last used in the org, or when it existed
    before the disable (so it should have been revoked then). A session a
    member opened after the disable for another of their orgs does not count.
    """
    disabled_ms = int(disabled_at.timestamp() * 1000)
    return [
        session
        for session in sessions
        if session["last_active_organization_id"] == org_id
        or session["created_at"] <= disabled_ms
    ]


# Onboarding: create or adopt the org, activate it when every step passed, and
# disable it when a later step failed.

STATUS_ONBOARDING = "onboarding"
ONBOARDING_FLOW = "onboarding"
# Clerk's API reference allows lowercase letters, digits and dashes in a slug.
# Leading, trailing and double dashes are rejected too, as the sandbox's Clerk
# stand-in does.
SLUG_PATTERN = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
# NOTE: Clerk documents no maximum slug length; 64 is this tool's own limit.
MAX_SLUG_LENGTH = 64
MAX_ORG_NAME_LENGTH = 256
USER_ID_PATTERN = re.compile(r"^user_[A-Za-z0-9]{1,60}$")
# Clerk keeps public metadata small, so a failure record carries a short error.
MAX_ERROR_LENGTH = 500


class InvalidOrgRequestError(ValueError):
    """An org name, slug or creator that onboarding rejects before any request."""


class OrganizationConflictError(IdentityProviderError):
    """The slug belongs to an org that onboarding must not adopt."""


def validate_slug(slug: object) -> str:
    """Return `slug` if Clerk would accept it as an org slug, else raise."""
    if not isinstance(slug, str) or not slug:
        raise InvalidOrgRequestError(
            f"invalid slug {slug!a}: it is empty; pass lowercase letters, digits "
            "and dashes, such as union-local-1234"
        )
    if len(slug) > MAX_SLUG_LENGTH:
        raise InvalidOrgRequestError(
            f"invalid slug {slug[:20]!a}... ({len(slug)} characters): the maximum "
            f"is {MAX_SLUG_LENGTH}"
        )
    if not SLUG_PATTERN.fullmatch(slug):
        raise InvalidOrgRequestError(
            f"invalid slug {slug!a}: use only lowercase letters, digits and single "
            "dashes between them, such as union-local-1234"
        )
    return slug


def validate_org_name(name: object) -> str:
    """Return `name` if it is a usable org name, else raise."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidOrgRequestError(
            f"invalid org name {name!a}: it is empty; pass the pilot union's name"
        )
    if len(name) > MAX_ORG_NAME_LENGTH:
        raise InvalidOrgRequestError(
            f"invalid org name {name[:20]!a}... ({len(name)} characters): the "
            f"maximum is {MAX_ORG_NAME_LENGTH}"
        )
    if name != name.strip() or any(ord(char) < 32 for char in name):
        raise InvalidOrgRequestError(
            f"invalid org name {name!a}: remove leading or trailing spaces and "
            "control characters"
        )
    return name


def validate_user_id(user_id: object) -> str:
    """Return `user_id` if it has the form of a Clerk user id, else raise."""
    if not isinstance(user_id, str) or not USER_ID_PATTERN.fullmatch(user_id):
        raise InvalidOrgRequestError(
            f"invalid creator {user_id!a}: expected a Clerk user id such as "
            "user_2abc123; pass --created-by or set UE_ONBOARDING_CREATED_BY"
        )
    return user_id


def describe_org(
    settings: Settings, organization: models.Organization, outcome: str
) -> dict:
    """Return the facts onboarding records about its org."""
    return {
        "org": organization.id,
        "name": organization.name,
        "slug": organization.slug,
        "created_by": organization.created_by,
        "outcome": outcome,
        "status": org_status(settings, organization)["status"],
    }


@task(name="create-clerk-org", cache_policy=NO_CACHE)
def create_clerk_org(
    settings: Settings, name: str, slug: str, created_by: str, run_id: str
) -> dict:
    """Create the org with pilot status onboarding, or adopt the org with this slug.

    Clerk has no idempotency keys, so the org is first looked up by slug. A
    create can still get 422 form_identifier_exists: when another create won
    a race, or when the SDK retried a create whose response was lost. The org
    is then looked up again and adopted under the same rule. Returns
    `describe_org` with outcome created, adopted or reopened.
    """
    logger = get_run_logger()
    clerk = open_clerk(settings)
    existing = get_organization(clerk, slug)
    if existing is None:
        record = {"flow": ONBOARDING_FLOW, "run_id": run_id}
        metadata = {
            settings.clerk_status_key: STATUS_ONBOARDING,
            f"{settings.clerk_status_key}_details": record,
        }
        try:
            created = clerk.organizations.create(request={
                "name": name, "slug": slug, "created_by": created_by,
                "public_metadata": metadata,
            })
        except models.ClerkErrors as error:
            if not slug_taken(error):
                raise IdentityProviderError(
                    f"creating org {slug!r} failed: {describe_clerk_error(error)}"
                ) from error
        except models.SDKError as error:
            raise IdentityProviderError(
                f"creating org {slug!r} failed: {describe_clerk_error(error)}"
            ) from error
        else:
            logger.info("created Clerk org %s (slug %s)", created.id, slug)
            return describe_org(settings, created, "created")
        existing = get_organization(clerk, slug)
        if existing is None:
            raise IdentityProviderError(
                f"Clerk reports slug {slug!r} taken, but no org has it; retry later"
            )
    return adopt_org(settings, clerk, existing, created_by, run_id)


def slug_taken(error: models.ClerkErrors) -> bool:
    return any(item.code == "form_identifier_exists" for item in error.data.errors)


def adopt_org(
    settings: Settings,
    clerk: Clerk,
    organization: models.Organization,
    created_by: str,
    run_id: str,
) -> dict:
    """Adopt an org of the same creator, reopening it if onboarding disabled it.

    An org that something else disabled (a rollback, an operator) is never
    reopened here: that needs a deliberate decision.
    """
    logger = get_run_logger()
    if organization.created_by != created_by:
        raise OrganizationConflictError(
            f"slug {organization.slug!r} is taken by org {organization.id}, created "
            f"by {organization.created_by!r}, not by {created_by!r}; choose another "
            "slug, or onboard as that org's creator"
        )
    record = org_status(settings, organization)
    status = record["status"]
    if status in (STATUS_ACTIVE, STATUS_ONBOARDING):
        logger.info("adopted Clerk org %s (status %s)", organization.id, status)
        return describe_org(settings, organization, "adopted")
    if status == STATUS_DISABLED and record.get("flow") == ONBOARDING_FLOW:
        set_org_status(settings, clerk, organization.id, STATUS_ONBOARDING, {
            "flow": ONBOARDING_FLOW,
            "run_id": run_id,
            "reopened_after_run": record.get("run_id"),
        })
        logger.info("reopened Clerk org %s that onboarding run %s disabled",
                    organization.id, record.get("run_id"))
        return dict(describe_org(settings, organization, "reopened"),
                    status=STATUS_ONBOARDING)
    raise OrganizationConflictError(
        f"org {organization.id} ({organization.slug!r}) has pilot status {status!r} "
        f"set by {record.get('flow') or 'someone other than onboarding'}; onboarding "
        "reopens only orgs that its own failed runs disabled, so re-enable it "
        "deliberately first"
    )


@create_clerk_org.on_rollback
def disable_failed_org(txn: Transaction) -> None:
    """Disable the org after a later step failed, recording the step and the error.

    The flow stores `org_id` and `failure` in the transaction before it leaves
    it. Prefect logs and swallows an error raised here, so the flow reads the
    status back afterwards (`confirm_org_disabled`).
    """
    org_id = txn.get("org_id", None)
    if not org_id:
        return
    failure = txn.get("failure", {})
    details = {"flow": ONBOARDING_FLOW, **failure}
    details["error"] = str(details.get("error", ""))[:MAX_ERROR_LENGTH]
    settings = Settings()
    set_org_status(settings, open_clerk(settings), org_id, STATUS_DISABLED, details)


@task(name="confirm-org-disabled", cache_policy=NO_CACHE)
def confirm_org_disabled(settings: Settings, org_id: str, run_id: str) -> CheckResult:
    """Read the org back and prove that this run's compensation disabled it."""
    check_id = "onboarding.compensation"
    try:
        organization = get_organization(open_clerk(settings), org_id)
    except IdentityProviderError as error:
        return inconclusive(check_id, f"org status unknown: {error}", org_id)
    if organization is None:
        return failed(check_id, "org not found in Clerk", org_id)
    record = org_status(settings, organization)
    if record["status"] == STATUS_DISABLED and record.get("run_id") == run_id:
        return passed(check_id, f"org disabled after step {record.get('step')}",
                      org_id, **record)
    return failed(
        check_id,
        "org NOT disabled by this run: disable it by hand (set "
        f"{settings.clerk_status_key}=disabled in its public metadata)",
        org_id,
        **record,
    )


@task(name="activate-clerk-org", cache_policy=NO_CACHE)
def activate_org(settings: Settings, org_id: str, run_id: str) -> CheckResult:
    """Set the org's pilot status to active, which only a fully proved run does.

    An org that is already active is left unchanged, so a re-run writes nothing.
    """
    check_id = "onboarding.org_active"
    clerk = open_clerk(settings)
    organization = get_organization(clerk, org_id)
    if organization is None:
        return failed(check_id, "org not found in Clerk", org_id)
    before = org_status(settings, organization)["status"]
    if before == STATUS_ACTIVE:
        return passed(check_id, "org already active; left unchanged", org_id)
    set_org_status(settings, clerk, org_id, STATUS_ACTIVE,
                   {"flow": ONBOARDING_FLOW, "run_id": run_id})
    after = org_status(settings, get_organization(clerk, org_id))["status"]
    if after != STATUS_ACTIVE:
        return failed(check_id, f"status reads back as {after!r}", org_id)
    return passed(check_id, f"status changed from {before} to active", org_id)


@task(name="obtain-probe-sessions", cache_policy=NO_CACHE, persist_result=False)
def obtain_probe_sessions(settings: Settings, org_id: str) -> dict[str, str]:
    """Return {role: session token} for the new org, or {} when none are known.

    Sessions listed for the org in UE_PROBE_SESSIONS come first. Otherwise a
    sandbox's UE_PROBE_SESSION_ISSUER_URL issues them.
    TODO: in production the new org's id is known only after step 1, so the
    first run fails at step 4 until the operator adds the sessions of probe
    users in the org to UE_PROBE_SESSIONS and re-runs.
    """
    logger = get_run_logger()
    configured = settings.probe_session_map().get(org_id) or {}
    if configured or not settings.probe_session_issuer_url:
        logger.info("probe sessions for %s: %d from UE_PROBE_SESSIONS",
                    org_id, len(configured))
        return configured
    response = httpx.post(
        settings.probe_session_issuer_url,
        json={"org_id": org_id, "roles": settings.role_hierarchy},
        timeout=settings.http_timeout_seconds,
        trust_env=False,
    )
    if response.status_code != 200:
        raise IdentityProviderError(
            f"the sandbox session issuer returned HTTP {response.status_code} for "
            f"org {org_id!r}"
        )
    sessions = response.json()["sessions"]
    logger.info("probe sessions for %s: %d from the sandbox issuer",
                org_id, len(sessions))
    return sessions
