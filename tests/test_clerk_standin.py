"""Tests of the Clerk Backend API stand-in, driven through the clerk-backend-api SDK."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from clerk_backend_api import Clerk
from clerk_backend_api.models import ClerkErrors, SDKError
from clerk_backend_api.utils import BackoffStrategy, RetryConfig

from ue_pilot.sandbox.clerk import ClerkState, create_clerk_app
from ue_pilot.sandbox.faults import UnknownFaultError
from ue_pilot.sandbox.servers import start_server

SECRET_KEY = "sk_test_sandbox_0123456789abcdef"

# The SDK's default retry covers 5XX only, so a 429 reaches the caller. This
# config retries 429 too, and names 5XX again because status_codes_override
# replaces each operation's own list of retried statuses. The SDK sleeps for the response's Retry-After when it
# has one and otherwise backs off from 100 ms. After 10 s it stops retrying and
# raises the last 429 as SDKError.
RETRY_429 = RetryConfig(
    "backoff",
    BackoffStrategy(
        initial_interval=100,
        max_interval=2_000,
        exponent=1.5,
        max_elapsed_time=10_000,
        jitter_ms=0,
    ),
    retry_connection_errors=False,
    status_codes_override=["429", "5XX"],
)


@dataclass
class ClerkSandbox:
    """A running stand-in: its base URL and its in-memory store."""

    url: str
    state: ClerkState


def run_clerk(**options) -> Iterator[ClerkSandbox]:
    """Serve a stand-in with `options` for the fixture's scope, then stop it."""
    app = create_clerk_app(SECRET_KEY, **options)
    running = start_server(app)
    yield ClerkSandbox(url=running.url, state=app.state.clerk)
    running.stop()


def sdk_client(server: ClerkSandbox, **options) -> Clerk:
    """Return an SDK client on `server` with the sandbox's secret key."""
    return Clerk(bearer_auth=SECRET_KEY, server_url=f"{server.url}/v1", **options)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def create_org(clerk: Clerk, **fields):
    """Create an organization with a unique name and slug."""
    slug = unique("local")
    return clerk.organizations.create(request={"name": slug, "slug": slug, **fields})


def create_user(clerk: Clerk):
    return clerk.users.create(
        email_address=[f"{unique('member')}@example.org"], first_name="Pat"
    )


def create_member_session(server: ClerkSandbox, clerk: Clerk, role: str = "org:member"):
    """Create an organization, a member in it and that member's active session."""
    org = create_org(clerk)
    user = create_user(clerk)
    clerk.organization_memberships.create(
        organization_id=org.id, user_id=user.id, role=role
    )
    session = server.state.create_session(user.id, org.id)
    return org, user, session


@pytest.fixture(scope="module")
def server():
    yield from run_clerk()


@pytest.fixture(scope="module")
def clerk(server):
    return sdk_client(server)


@pytest.fixture(scope="module")
def fault_rate_limited_server():
    yield from run_clerk(faults={"clerk-rate-limited"})


@pytest.fixture(scope="module")
def fault_revoke_server():
    yield from run_clerk(faults={"session-survives-revoke"})


@pytest.fixture(scope="module")
def rate_limited_server():
    yield from run_clerk(rate_limit=3)


# Organizations


def test_create_org_returns_clerk_shape(clerk):
    """A created organization has an org_ id of 31 characters and ms timestamps."""
    org = create_org(clerk, public_metadata={"tier": "pilot"})

    assert org.id.startswith("org_")
    assert len(org.id) == 31
    assert org.created_at > 10**12
    assert org.public_metadata == {"tier": "pilot"}


def test_create_org_created_by_becomes_admin(clerk):
    """The created_by user becomes the organization's first org:admin."""
    user = create_user(clerk)
    org = create_org(clerk, created_by=user.id)

    memberships = clerk.organization_memberships.list(organization_id=org.id)

    assert memberships.total_count == 1
    assert memberships.data[0].role == "org:admin"
    assert memberships.data[0].public_user_data.user_id == user.id


def test_create_org_duplicate_slug(clerk):
    """A second organization with a taken slug raises 422 form_identifier_exists."""
    org = create_org(clerk)

    with pytest.raises(ClerkErrors) as caught:
        clerk.organizations.create(request={"name": "Copy", "slug": org.slug})

    error = caught.value.data.errors[0]
    assert caught.value.status_code == 422
    assert error.code == "form_identifier_exists"
    assert error.meta == {"param_name": "slug"}


def test_create_org_without_name(clerk):
    """An organization without a name raises 422 form_param_missing."""
    with pytest.raises(ClerkErrors) as caught:
        clerk.organizations.create(request={"name": " "})

    assert caught.value.data.errors[0].code == "form_param_missing"


def test_get_org_by_slug(clerk):
    """Getting an organization by its slug returns the same organization."""
    org = create_org(clerk)

    assert clerk.organizations.get(organization_id=org.slug).id == org.id


def test_get_org_unknown_id(clerk):
    """An unknown organization id raises 404 resource_not_found."""
    with pytest.raises(ClerkErrors) as caught:
        clerk.organizations.get(organization_id="org_" + "0" * 27)

    assert caught.value.status_code == 404
    assert caught.value.data.errors[0].code == "resource_not_found"


def test_list_orgs_pages_query_matches(clerk):
    """Listing by query returns one page and the count of every match."""
    token = unique("page")
    for index in range(3):
        clerk.organizations.create(request={"name": f"{token} {index}"})

    page = clerk.organizations.list(query=token, limit=2, offset=0)

    assert len(page.data) == 2
    assert page.total_count == 3


def test_list_orgs_newest_first(clerk):
    """Organizations are listed newest first by default."""
    token = unique("order")
    first = clerk.organizations.create(request={"name": f"{token} first"})
    second = clerk.organizations.create(request={"name": f"{token} second"})

    page = clerk.organizations.list(query=token)

    assert [org.id for org in page.data] == [second.id, first.id]


def test_update_org_name(clerk):
    """Updating the name changes it and keeps the slug."""
    org = create_org(clerk)

    updated = clerk.organizations.update(organization_id=org.id, name="Renamed")

    assert updated.name == "Renamed"
    assert updated.slug == org.slug


def test_update_org_to_taken_slug(clerk):
    """Renaming the slug to another organization's slug raises 422."""
    other_org = create_org(clerk)
    org = create_org(clerk)

    with pytest.raises(ClerkErrors) as caught:
        clerk.organizations.update(organization_id=org.id, slug=other_org.slug)

    assert caught.value.data.errors[0].code == "form_identifier_exists"


def test_merge_metadata_deep_merges(clerk):
    """Merging metadata adds keys and keeps the keys it does not name."""
    org = create_org(clerk, public_metadata={"plan": "pilot", "flags": {"a": True}})

    merged = clerk.organizations.merge_metadata(
        organization_id=org.id,
        public_metadata={"status": "disabled", "flags": {"b": False}},
        private_metadata={"disabled_by": "runbook"},
    )

    assert merged.public_metadata == {
        "plan": "pilot",
        "status": "disabled",
        "flags": {"a": True, "b": False},
    }
    assert merged.private_metadata == {"disabled_by": "runbook"}


def test_merge_metadata_null_removes_key(clerk):
    """A key merged as null is removed from the metadata."""
    org = create_org(clerk, public_metadata={"status": "disabled", "plan": "pilot"})

    merged = clerk.organizations.merge_metadata(
        organization_id=org.id, public_metadata={"status": None}
    )

    assert merged.public_metadata == {"plan": "pilot"}


def test_delete_org(clerk):
    """A deleted organization is gone and getting it raises 404."""
    org = create_org(clerk)

    deleted = clerk.organizations.delete(organization_id=org.id)

    assert deleted.deleted is True
    with pytest.raises(ClerkErrors):
        clerk.organizations.get(organization_id=org.id)


# Users


def test_create_user_returns_verified_email(clerk):
    """A created user has a user_ id and its email as the primary address."""
    user = clerk.users.create(
        email_address=["Casey@Example.org"], first_name="Casey", external_id=unique("x")
    )

    assert user.id.startswith("user_")
    assert user.email_addresses[0].email_address == "casey@example.org"
    assert user.primary_email_address_id == user.email_addresses[0].id


def test_create_user_duplicate_email(clerk):
    """A second user with a taken email address raises form_identifier_exists."""
    user = create_user(clerk)
    email = user.email_addresses[0].email_address

    with pytest.raises(ClerkErrors) as caught:
        clerk.users.create(email_address=[email])

    assert caught.value.data.errors[0].code == "form_identifier_exists"


def test_get_user(clerk):
    """Getting a user by id returns that user."""
    user = create_user(clerk)

    assert clerk.users.get(user_id=user.id).first_name == "Pat"


def test_list_users_by_user_id(clerk):
    """Listing with user_id returns only the named users."""
    user = create_user(clerk)
    create_user(clerk)

    users = clerk.users.list(request={"user_id": [user.id]})

    assert [found.id for found in users] == [user.id]


def test_list_users_by_org(clerk, server):
    """Listing with organization_id returns the organization's members."""
    org, user, _ = create_member_session(server, clerk)

    users = clerk.users.list(request={"organization_id": [org.id]})

    assert [found.id for found in users] == [user.id]


# Organization memberships


def test_membership_listed_with_user_id(clerk):
    """A new member appears in the organization's membership list."""
    org = create_org(clerk)
    user = create_user(clerk)
    clerk.organization_memberships.create(
        organization_id=org.id, user_id=user.id, role="org:member"
    )

    memberships = clerk.organization_memberships.list(organization_id=org.id)

    assert memberships.total_count == 1
    assert memberships.data[0].public_user_data.user_id == user.id
    assert memberships.data[0].role == "org:member"


def test_membership_update_role(clerk, server):
    """Updating a membership changes its role."""
    org, user, _ = create_member_session(server, clerk)

    updated = clerk.organization_memberships.update(
        organization_id=org.id, user_id=user.id, role="org:admin"
    )

    assert updated.role == "org:admin"


def test_membership_delete(clerk, server):
    """A deleted membership no longer appears in the list."""
    org, user, _ = create_member_session(server, clerk)

    clerk.organization_memberships.delete(organization_id=org.id, user_id=user.id)

    memberships = clerk.organization_memberships.list(organization_id=org.id)
    assert memberships.total_count == 0


def test_membership_twice(clerk, server):
    """Adding a member a second time raises already_a_member_in_organization."""
    org, user, _ = create_member_session(server, clerk)

    with pytest.raises(ClerkErrors) as caught:
        clerk.organization_memberships.create(
            organization_id=org.id, user_id=user.id, role="org:member"
        )

    assert caught.value.data.errors[0].code == "already_a_member_in_organization"


def test_membership_quota(clerk):
    """An organization at max_allowed_memberships rejects another member."""
    owner = create_user(clerk)
    org = create_org(clerk, created_by=owner.id, max_allowed_memberships=1)
    user = create_user(clerk)

    with pytest.raises(ClerkErrors) as caught:
        clerk.organization_memberships.create(
            organization_id=org.id, user_id=user.id, role="org:member"
        )

    assert caught.value.status_code == 403
    error_code = caught.value.data.errors[0].code
    assert error_code == "organization_membership_quota_exceeded"


# Sessions


def test_list_sessions_active_by_user(clerk, server):
    """Listing a user's active sessions returns the session with its org id."""
    org, user, session = create_member_session(server, clerk)

    sessions = clerk.sessions.list(user_id=user.id, status="active")

    assert [found.id for found in sessions] == [session["id"]]
    assert sessions[0].last_active_organization_id == org.id
    assert sessions[0].id.startswith("sess_")


def test_list_sessions_needs_user_or_client(clerk):
    """Listing sessions without user_id or client_id raises 422."""
    with pytest.raises(ClerkErrors) as caught:
        clerk.sessions.list(status="active")

    assert caught.value.status_code == 422
    assert caught.value.data.errors[0].code == "form_param_missing"


def test_revoke_session(clerk, server):
    """A revoked session reads as revoked and leaves the active list."""
    _, user, session = create_member_session(server, clerk)

    revoked = clerk.sessions.revoke(session_id=session["id"])

    assert revoked.status == "revoked"
    assert clerk.sessions.get(session_id=session["id"]).status == "revoked"
    assert clerk.sessions.list(user_id=user.id, status="active") == []


def test_sdk_create_session(clerk, server):
    """The SDK's sessions.create makes an active session in the organization."""
    org, user, _ = create_member_session(server, clerk)

    session = clerk.sessions.create(
        request={"user_id": user.id, "active_organization_id": org.id}
    )

    assert session.status == "active"
    assert session.last_active_organization_id == org.id


def test_sandbox_session_route(clerk, server):
    """POST /sandbox/sessions creates an active session without the secret key."""
    org = create_org(clerk)
    user = create_user(clerk)
    clerk.organization_memberships.create(
        organization_id=org.id, user_id=user.id, role="org:member"
    )

    response = httpx.post(
        f"{server.url}/sandbox/sessions",
        json={"user_id": user.id, "organization_id": org.id},
    )

    assert response.status_code == 200
    assert response.json()["status"] == "active"


def test_session_for_non_member(clerk, server):
    """A session in an organization the user is not a member of is rejected."""
    org = create_org(clerk)
    user = create_user(clerk)

    response = httpx.post(
        f"{server.url}/sandbox/sessions",
        json={"user_id": user.id, "organization_id": org.id},
    )

    assert response.status_code == 403


# Authentication


def test_missing_authorization(server):
    """A request without a secret key gets 401 authentication_invalid."""
    response = httpx.get(f"{server.url}/v1/organizations")

    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "authentication_invalid"


def test_wrong_key_raises_sdk_error(server):
    """The SDK raises SDKError with status 401 for a wrong secret key."""
    clerk = Clerk(bearer_auth="sk_test_wrong", server_url=f"{server.url}/v1")

    with pytest.raises(SDKError) as caught:
        clerk.organizations.list()

    assert caught.value.status_code == 401


# Faults and rate limits


def test_fault_session_survives_revoke(fault_revoke_server):
    """With session-survives-revoke, a revoked session stays in the active list."""
    clerk = sdk_client(fault_revoke_server)
    _, user, session = create_member_session(fault_revoke_server, clerk)

    revoked = clerk.sessions.revoke(session_id=session["id"])

    assert revoked.status == "revoked"
    active = clerk.sessions.list(user_id=user.id, status="active")
    assert [found.id for found in active] == [session["id"]]


def test_fault_rate_limited_raises_429(fault_rate_limited_server):
    """With clerk-rate-limited and default retries, one of three calls raises 429."""
    clerk = sdk_client(fault_rate_limited_server)
    errors = []
    for _ in range(3):
        try:
            clerk.organizations.list()
        except SDKError as error:
            errors.append(error)

    assert len(errors) == 1
    assert errors[0].status_code == 429
    assert errors[0].headers["retry-after"] == "1"
    assert '"too_many_requests"' in errors[0].body


def test_fault_rate_limited_retried(fault_rate_limited_server):
    """A retry config with status_codes_override retries the 429s to success."""
    clerk = sdk_client(fault_rate_limited_server, retry_config=RETRY_429)
    stats_url = f"{fault_rate_limited_server.url}/sandbox/stats"
    before = httpx.get(stats_url).json()["by_status"].get("429", 0)

    orgs = [create_org(clerk) for _ in range(3)]

    after = httpx.get(stats_url).json()["by_status"].get("429", 0)
    assert len({org.id for org in orgs}) == 3
    assert after > before


def test_rate_limit_429_retry_after(rate_limited_server):
    """Past rate_limit requests in 10 s, the stand-in returns 429 with Retry-After."""
    clerk = sdk_client(rate_limited_server)
    for _ in range(3):
        clerk.organizations.list()

    with pytest.raises(SDKError) as caught:
        clerk.organizations.list()

    assert caught.value.status_code == 429
    assert 1 <= int(caught.value.headers["retry-after"]) <= 10


def test_unknown_fault():
    """An unknown fault name raises UnknownFaultError."""
    with pytest.raises(UnknownFaultError):
        create_clerk_app(SECRET_KEY, faults={"clerk-down"})


# Sandbox inspection


def test_state_lists_records(clerk, server):
    """GET /sandbox/state returns the organizations, memberships and sessions."""
    org, user, session = create_member_session(server, clerk)

    state = httpx.get(f"{server.url}/sandbox/state").json()

    assert org.id in {item["id"] for item in state["organizations"]}
    assert (org.id, user.id) in {
        (item["organization_id"], item["user_id"]) for item in state["memberships"]
    }
    assert session["id"] in {item["id"] for item in state["sessions"]}


def test_stats_count_routes(clerk, server):
    """GET /sandbox/stats counts each /v1 request under its route."""
    stats_url = f"{server.url}/sandbox/stats"
    before = httpx.get(stats_url).json()["by_route"].get("GET /v1/organizations", 0)

    clerk.organizations.list()

    after = httpx.get(stats_url).json()["by_route"]["GET /v1/organizations"]
    assert after == before + 1
