"""A stand-in for the Clerk Backend API v1, as the clerk-backend-api 7.0.0 SDK calls it.

Point the SDK at it with `Clerk(bearer_auth=secret_key,
server_url="http://127.0.0.1:PORT/v1")`. Paths, request bodies and response
shapes follow the SDK's operations and models, so the SDK parses every response
into its own types:

- organizations: `GET|POST /v1/organizations`, `GET|PATCH|DELETE
  /v1/organizations/{organization_id}` (GET also takes a slug), and `PATCH|PUT
  /v1/organizations/{organization_id}/metadata` to merge or replace metadata.
- organization memberships: `GET|POST
  /v1/organizations/{organization_id}/memberships` and `PATCH|DELETE
  /v1/organizations/{organization_id}/memberships/{user_id}`.
- users: `GET|POST /v1/users` and `GET /v1/users/{user_id}`.
- sessions: `GET|POST /v1/sessions`, `GET /v1/sessions/{session_id}` and `POST
  /v1/sessions/{session_id}/revoke`.

Every `/v1` request needs `Authorization: Bearer <secret key>`. Errors use
Clerk's body, `{"errors": [{"message", "long_message", "code", "meta"}],
"clerk_trace_id"}`, which the SDK raises as `ClerkErrors` for the statuses an
operation declares and as `SDKError` otherwise (401 and 429 among them for
most operations). With `rate_limit` set, a request beyond that many in 10 s
gets 429 with `Retry-After` in seconds. Clerk's rate-limits page
(clerk.com/docs/guides/how-clerk-works/system-limits) gives 1000 requests per
10 s for a production instance and 100 for a development one, counted per
secret key, so the stand-in counts only requests with the right key.

Three routes exist only in the sandbox and need no key: `POST /sandbox/sessions`
creates an active session, `GET /sandbox/state` returns every organization,
user, membership and session, and `GET /sandbox/stats` counts the `/v1`
requests by route and by status.
"""

from __future__ import annotations

import collections
import copy
import hmac
import logging
import math
import re
import secrets
import string
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ue_pilot.sandbox.faults import FAULTS, UnknownFaultError

__all__ = [
    "CLERK_FAULTS",
    "ClerkAPIError",
    "ClerkState",
    "create_clerk_app",
]

logger = logging.getLogger(__name__)

CLERK_FAULTS: dict[str, str] = {
    name: FAULTS[name] for name in ("clerk-rate-limited", "session-survives-revoke")
}

RATE_LIMIT_WINDOW_SECONDS = 10
FAULT_RETRY_AFTER_SECONDS = 1
MAX_NAME_LENGTH = 256
MAX_PAGE_LIMIT = 500
SESSION_LIFETIME_MS = 7 * 24 * 3600 * 1000
SESSION_ABANDON_MS = 30 * 24 * 3600 * 1000
SESSION_STATUSES = (
    "active",
    "revoked",
    "ended",
    "expired",
    "removed",
    "abandoned",
    "replaced",
    "pending",
)
# The default roles of a Clerk instance and their system permissions. Custom
# roles are not modelled.
ROLE_PERMISSIONS: dict[str, list[str]] = {
    "org:admin": [
        "org:sys_profile:manage",
        "org:sys_profile:delete",
        "org:sys_memberships:read",
        "org:sys_memberships:manage",
        "org:sys_domains:read",
        "org:sys_domains:manage",
    ],
    "org:member": ["org:sys_memberships:read"],
}
ROLE_NAMES = {"org:admin": "Admin", "org:member": "Member"}

_BASE62 = string.digits + string.ascii_letters
_SLUG_PATTERN = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")


class ClerkAPIError(Exception):
    """An error the stand-in returns with Clerk's error body and an HTTP status.

    NOTE: the SDK's models give only which statuses carry this body. The
    status and code for a missing session filter, a malformed parameter, an
    unknown role or `created_by` user, a second membership and a full
    organization are best guesses.
    """

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        long_message: str,
        param_name: str | None = None,
    ) -> None:
        super().__init__(long_message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.long_message = long_message
        self.param_name = param_name

    def to_body(self) -> dict:
        """Build the response body, with a fresh `clerk_trace_id`."""
        error = {
            "message": self.message,
            "long_message": self.long_message,
            "code": self.code,
        }
        if self.param_name is not None:
            error["meta"] = {"param_name": self.param_name}
        return {"errors": [error], "clerk_trace_id": secrets.token_hex(16)}


def _not_found(kind: str, key: str) -> ClerkAPIError:
    return ClerkAPIError(
        404, "resource_not_found", "not found", f"No {kind} was found with {key!r}."
    )


def _param_missing(name: str) -> ClerkAPIError:
    return ClerkAPIError(
        422,
        "form_param_missing",
        "is missing",
        f"The parameter '{name}' is required.",
        name,
    )


def _param_invalid(name: str, reason: str) -> ClerkAPIError:
    return ClerkAPIError(
        422,
        "form_param_format_invalid",
        "is invalid",
        f"The parameter '{name}' is invalid: {reason}.",
        name,
    )


def _identifier_exists(name: str, value: str) -> ClerkAPIError:
    return ClerkAPIError(
        422,
        "form_identifier_exists",
        "is taken",
        f"The {name} {value!r} is already in use. Choose another.",
        name,
    )


def _new_id(prefix: str) -> str:
    """Return `prefix` and 27 random base62 characters, the length of Clerk's ids."""
    return prefix + "".join(secrets.choice(_BASE62) for _ in range(27))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "organization"


def _merge_metadata(current: dict, patch: dict) -> dict:
    """Deep-merge `patch` into a copy of `current`, removing keys set to null."""
    merged = copy.deepcopy(current)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_metadata(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _matches_id_filter(value: str, filters: Sequence[str]) -> bool:
    """Apply Clerk's id filter, where `-id` excludes and `id` or `+id` includes.

    A value passes when it is not excluded and, if any id is included, is one of
    the included ids.
    """
    excluded = {item[1:] for item in filters if item.startswith("-")}
    included = {item.lstrip("+") for item in filters if not item.startswith("-")}
    if value in excluded:
        return False
    return not included or value in included


def _sort_records(records: list[dict], order_by: str, fields: Iterable[str]) -> None:
    """Sort `records` in place by `order_by`, a field with an optional +/- prefix."""
    descending = order_by.startswith("-")
    field = order_by.lstrip("+-")
    if field not in fields:
        raise _param_invalid("order_by", f"{field!r} is not one of {sorted(fields)}")
    records.sort(key=lambda record: (record[field], record["_seq"]), reverse=descending)


def _page(records: list, limit: int, offset: int) -> list:
    return records[offset : offset + limit]


class ClerkState:
    """The organizations, users, memberships and sessions of one Clerk instance.

    A lock guards every read and write, so a test thread may call these methods
    while the server's event loop serves requests. Methods return deep copies
    shaped as the Backend API returns them, and raise ClerkAPIError for a
    request Clerk would reject.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._seq = 0
        self._organizations: dict[str, dict] = {}
        self._users: dict[str, dict] = {}
        self._memberships: dict[tuple[str, str], dict] = {}
        self._sessions: dict[str, dict] = {}

    # Organizations

    def create_organization(self, body: dict) -> dict:
        """Create an organization from a CreateOrganization request body.

        A `created_by` user becomes the organization's first `org:admin`, as in
        Clerk. Without a slug, one is derived from the name.
        """
        fields = {
            "name": _required_name(body),
            "max_allowed_memberships": (
                _optional_int(body, "max_allowed_memberships") or 0
            ),
            "public_metadata": _optional_dict(body, "public_metadata") or {},
            "private_metadata": _optional_dict(body, "private_metadata") or {},
            "created_by": _optional_str(body, "created_by"),
        }
        requested_slug = _optional_str(body, "slug")
        created_by = fields["created_by"]
        with self._lock:
            slug = self._claim_slug(requested_slug, fields["name"])
            if created_by is not None and created_by not in self._users:
                raise ClerkAPIError(
                    422,
                    "resource_not_found",
                    "not found",
                    f"The created_by user {created_by!r} does not exist.",
                    "created_by",
                )
            organization = self._insert_organization(fields, slug)
            if created_by is not None:
                self._add_membership(organization, created_by, "org:admin", {})
            logger.info(
                "clerk organization created: organization_id=%s", organization["id"]
            )
            return self._render_organization(organization, members_count=True)

    def seed_organization(
        self, organization_id: str, name: str, slug: str, created_by: str | None
    ) -> dict:
        """Create an organization with a fixed id, as the sandbox's pilot orgs need.

        The Backend API always generates ids. The sandbox seeds its orgs with the
        ids its database and telemetry use, so this bypasses that.
        """
        fields = {
            "name": name,
            "max_allowed_memberships": 0,
            "public_metadata": {},
            "private_metadata": {},
            "created_by": created_by,
        }
        with self._lock:
            if organization_id in self._organizations:
                raise _identifier_exists("id", organization_id)
            slug = self._claim_slug(slug, name)
            organization = self._insert_organization(fields, slug, organization_id)
            if created_by is not None:
                self._add_membership(organization, created_by, "org:admin", {})
            return self._render_organization(organization, members_count=True)

    def get_organization(self, organization_id_or_slug: str) -> dict:
        """Return the organization with this id or, failing that, this slug."""
        with self._lock:
            organization = self._organizations.get(organization_id_or_slug)
            if organization is None:
                organization = self._find_by_slug(organization_id_or_slug)
            if organization is None:
                raise _not_found("organization", organization_id_or_slug)
            return self._render_organization(organization, members_count=True)

    def list_organizations(
        self,
        *,
        query: str | None = None,
        user_ids: Sequence[str] = (),
        organization_ids: Sequence[str] = (),
        order_by: str = "-created_at",
        limit: int = 10,
        offset: int = 0,
        include_members_count: bool = False,
    ) -> dict:
        """Return `{"data", "total_count"}` for the matching organizations.

        `query` matches an id exactly and a name or slug in part, ignoring case.
        `total_count` counts every match, not only the page.
        """
        with self._lock:
            records = [
                organization
                for organization in self._organizations.values()
                if self._organization_matches(
                    organization, query, user_ids, organization_ids
                )
            ]
            sortable = [
                {**record, "members_count": self._count_members(record["id"])}
                for record in records
            ]
            _sort_records(sortable, order_by, ("created_at", "name", "members_count"))
            page = [
                self._render_organization(record, include_members_count)
                for record in _page(sortable, limit, offset)
            ]
            return {"data": page, "total_count": len(sortable)}

    def update_organization(self, organization_id: str, body: dict) -> dict:
        """Apply an UpdateOrganization request body, skipping null fields.

        Metadata in the body replaces the stored metadata, as in Clerk.
        """
        with self._lock:
            organization = self._organization(organization_id)
            changes = self._organization_changes(organization, body)
            organization.update(changes)
            organization["updated_at"] = _now_ms()
            return self._render_organization(organization, members_count=True)

    def merge_organization_metadata(self, organization_id: str, body: dict) -> dict:
        """Deep-merge public and private metadata, removing keys set to null."""
        with self._lock:
            organization = self._organization(organization_id)
            for field in ("public_metadata", "private_metadata"):
                patch = _optional_dict(body, field)
                if patch is not None:
                    organization[field] = _merge_metadata(organization[field], patch)
            organization["updated_at"] = _now_ms()
            return self._render_organization(organization, members_count=True)

    def replace_organization_metadata(self, organization_id: str, body: dict) -> dict:
        """Replace each metadata object present in `body`."""
        with self._lock:
            organization = self._organization(organization_id)
            for field in ("public_metadata", "private_metadata"):
                if field in body:
                    organization[field] = _optional_dict(body, field) or {}
            organization["updated_at"] = _now_ms()
            return self._render_organization(organization, members_count=True)

    def delete_organization(self, organization_id: str) -> dict:
        """Delete an organization and its memberships, leaving sessions as they are."""
        with self._lock:
            organization = self._organization(organization_id)
            del self._organizations[organization_id]
            for key in [key for key in self._memberships if key[0] == organization_id]:
                del self._memberships[key]
            logger.info(
                "clerk organization deleted: organization_id=%s", organization_id
            )
            return {
                "object": "organization",
                "id": organization_id,
                "slug": organization["slug"],
                "deleted": True,
            }

    # Users

    def create_user(self, body: dict) -> dict:
        """Create a user from a CreateUser request body, every email verified.

        An email address or external id that another user has gives 422
        `form_identifier_exists`.
        """
        emails = [e.lower() for e in _optional_str_list(body, "email_address")]
        external_id = _optional_str(body, "external_id")
        with self._lock:
            self._check_user_identifiers(emails, external_id)
            now = _now_ms()
            email_objects = [_email_address(email, now) for email in emails]
            user = {
                "id": _new_id("user_"),
                "object": "user",
                "external_id": external_id,
                "primary_email_address_id": (
                    email_objects[0]["id"] if email_objects else None
                ),
                "primary_phone_number_id": None,
                "primary_web3_wallet_id": None,
                "username": _optional_str(body, "username"),
                "first_name": _optional_str(body, "first_name"),
                "last_name": _optional_str(body, "last_name"),
                "has_image": False,
                "public_metadata": _optional_dict(body, "public_metadata") or {},
                "private_metadata": _optional_dict(body, "private_metadata") or {},
                "unsafe_metadata": _optional_dict(body, "unsafe_metadata") or {},
                "email_addresses": email_objects,
                **_EMPTY_USER_FIELDS,
                "created_at": now,
                "updated_at": now,
                "_seq": self._next_seq(),
            }
            self._users[user["id"]] = user
            return _public(user)

    def get_user(self, user_id: str) -> dict:
        """Return a user, raising 404 `resource_not_found` for an unknown id."""
        with self._lock:
            return _public(self._user(user_id))

    def list_users(
        self,
        *,
        user_ids: Sequence[str] = (),
        organization_ids: Sequence[str] = (),
        email_addresses: Sequence[str] = (),
        external_ids: Sequence[str] = (),
        query: str | None = None,
        order_by: str = "-created_at",
        limit: int = 10,
        offset: int = 0,
    ) -> list[dict]:
        """Return the matching users as a plain list, as Clerk's ListUsers does.

        `organization_ids` keeps the users with a membership in any of them.
        """
        with self._lock:
            records = [
                user
                for user in self._users.values()
                if self._user_matches(
                    user, user_ids, organization_ids, email_addresses, external_ids
                )
                and _user_matches_query(user, query)
            ]
            _sort_records(records, order_by, ("created_at", "updated_at"))
            return [_public(user) for user in _page(records, limit, offset)]

    # Organization memberships

    def create_membership(
        self,
        organization_id: str,
        user_id: str,
        role: str,
        public_metadata: dict | None = None,
    ) -> dict:
        """Add a user to an organization with `role`.

        Raises 400 `already_a_member_in_organization` for a second membership
        and 403 `organization_membership_quota_exceeded` when the organization
        is at its `max_allowed_memberships` (0 means no limit).
        """
        _check_role(role)
        with self._lock:
            organization = self._organization(organization_id)
            self._user(user_id)
            if (organization_id, user_id) in self._memberships:
                raise ClerkAPIError(
                    400,
                    "already_a_member_in_organization",
                    "already a member",
                    f"User {user_id!r} is already a member of the organization.",
                )
            limit = organization["max_allowed_memberships"]
            if limit and self._count_members(organization_id) >= limit:
                raise ClerkAPIError(
                    403,
                    "organization_membership_quota_exceeded",
                    "membership quota exceeded",
                    f"The organization allows at most {limit} memberships.",
                )
            membership = self._add_membership(
                organization, user_id, role, public_metadata or {}
            )
            return self._render_membership(membership)

    def list_memberships(
        self,
        organization_id: str,
        *,
        user_ids: Sequence[str] = (),
        roles: Sequence[str] = (),
        order_by: str = "-created_at",
        limit: int = 10,
        offset: int = 0,
    ) -> dict:
        """Return `{"data", "total_count"}` for an organization's memberships."""
        with self._lock:
            self._organization(organization_id)
            records = [
                membership
                for (org_id, user_id), membership in self._memberships.items()
                if org_id == organization_id
                and (not user_ids or _matches_id_filter(user_id, user_ids))
                and (not roles or membership["role"] in roles)
            ]
            _sort_records(records, order_by, ("created_at", "role"))
            page = [self._render_membership(m) for m in _page(records, limit, offset)]
            return {"data": page, "total_count": len(records)}

    def update_membership(self, organization_id: str, user_id: str, role: str) -> dict:
        """Change the role of a user's membership in an organization."""
        _check_role(role)
        with self._lock:
            membership = self._membership(organization_id, user_id)
            membership["role"] = role
            membership["updated_at"] = _now_ms()
            return self._render_membership(membership)

    def delete_membership(self, organization_id: str, user_id: str) -> dict:
        """Remove a membership and return it. The user's sessions stay active."""
        with self._lock:
            membership = self._membership(organization_id, user_id)
            del self._memberships[(organization_id, user_id)]
            return self._render_membership(membership)

    # Sessions

    def create_session(self, user_id: str, organization_id: str | None = None) -> dict:
        """Create an active session on a new client, as a sign-in would.

        With `organization_id`, the user must be a member of it and the session
        records it as `last_active_organization_id`.
        """
        with self._lock:
            self._user(user_id)
            if organization_id is not None:
                self._organization(organization_id)
                if (organization_id, user_id) not in self._memberships:
                    raise ClerkAPIError(
                        403,
                        "not_a_member_in_organization",
                        "not a member",
                        f"User {user_id!r} is not a member of {organization_id!r}.",
                    )
            now = _now_ms()
            session = {
                "object": "session",
                "id": _new_id("sess_"),
                "user_id": user_id,
                "client_id": _new_id("client_"),
                "status": "active",
                "last_active_organization_id": organization_id,
                "last_active_at": now,
                "expire_at": now + SESSION_LIFETIME_MS,
                "abandon_at": now + SESSION_ABANDON_MS,
                "created_at": now,
                "updated_at": now,
                "_seq": self._next_seq(),
            }
            self._sessions[session["id"]] = session
            return _public(session)

    def get_session(self, session_id: str) -> dict:
        """Return a session, raising 404 `resource_not_found` for an unknown id."""
        with self._lock:
            return _public(self._session(session_id))

    def list_sessions(
        self,
        *,
        user_id: str | None = None,
        client_id: str | None = None,
        status: str | None = None,
        limit: int = 10,
        offset: int = 0,
    ) -> list[dict]:
        """Return the sessions of a user or a client, newest first.

        Clerk requires `user_id` or `client_id` and has no organization filter.
        """
        if user_id is None and client_id is None:
            raise ClerkAPIError(
                422,
                "form_param_missing",
                "is missing",
                "Either 'user_id' or 'client_id' is required.",
                "user_id",
            )
        if status is not None and status not in SESSION_STATUSES:
            raise _param_invalid("status", f"use one of {', '.join(SESSION_STATUSES)}")
        with self._lock:
            records = [
                session
                for session in self._sessions.values()
                if (user_id is None or session["user_id"] == user_id)
                and (client_id is None or session["client_id"] == client_id)
                and (status is None or session["status"] == status)
            ]
            _sort_records(records, "-created_at", ("created_at",))
            return [_public(session) for session in _page(records, limit, offset)]

    def revoke_session(self, session_id: str, *, persist: bool = True) -> dict:
        """Revoke an active session and return it.

        A session that is not active is returned unchanged. With
        `persist=False` the returned copy has status "revoked" but the stored
        session stays active, which is the `session-survives-revoke` fault.
        """
        with self._lock:
            session = self._session(session_id)
            if session["status"] != "active":
                return _public(session)
            revoked = {**session, "status": "revoked", "updated_at": _now_ms()}
            if persist:
                self._sessions[session_id] = revoked
            logger.info(
                "clerk session revoked: session_id=%s persisted=%s", session_id, persist
            )
            return _public(revoked)

    # Inspection

    def snapshot(self) -> dict:
        """Return every record, memberships in a flat form with both ids."""
        with self._lock:
            organizations = [
                self._render_organization(organization, members_count=True)
                for organization in self._organizations.values()
            ]
            memberships = [
                {
                    "id": membership["id"],
                    "organization_id": organization_id,
                    "user_id": user_id,
                    "role": membership["role"],
                    "created_at": membership["created_at"],
                    "updated_at": membership["updated_at"],
                }
                for (organization_id, user_id), membership in self._memberships.items()
            ]
            return {
                "organizations": organizations,
                "users": [_public(user) for user in self._users.values()],
                "memberships": memberships,
                "sessions": [_public(s) for s in self._sessions.values()],
            }

    # Helpers below expect the caller to hold the lock.

    def _next_seq(self) -> int:
        """Return an insertion counter that orders records created in the same ms."""
        self._seq += 1
        return self._seq

    def _organization(self, organization_id: str) -> dict:
        organization = self._organizations.get(organization_id)
        if organization is None:
            raise _not_found("organization", organization_id)
        return organization

    def _user(self, user_id: str) -> dict:
        user = self._users.get(user_id)
        if user is None:
            raise _not_found("user", user_id)
        return user

    def _membership(self, organization_id: str, user_id: str) -> dict:
        self._organization(organization_id)
        membership = self._memberships.get((organization_id, user_id))
        if membership is None:
            raise _not_found("organization membership", f"{organization_id}/{user_id}")
        return membership

    def _session(self, session_id: str) -> dict:
        session = self._sessions.get(session_id)
        if session is None:
            raise _not_found("session", session_id)
        return session

    def _find_by_slug(self, slug: str) -> dict | None:
        for organization in self._organizations.values():
            if organization["slug"] == slug:
                return organization
        return None

    def _claim_slug(self, slug: str | None, name: str) -> str:
        """Validate a requested slug, or derive a free one from `name`."""
        if slug is not None:
            _check_slug(slug)
            if self._find_by_slug(slug) is not None:
                raise _identifier_exists("slug", slug)
            return slug
        candidate = _slugify(name)
        while self._find_by_slug(candidate) is not None:
            candidate = f"{_slugify(name)}-{secrets.token_hex(3)}"
        return candidate

    def _insert_organization(
        self, fields: dict, slug: str, organization_id: str | None = None
    ) -> dict:
        now = _now_ms()
        organization = {
            "object": "organization",
            "id": organization_id or _new_id("org_"),
            "slug": slug,
            "has_image": False,
            "admin_delete_enabled": True,
            **fields,
            "created_at": now,
            "updated_at": now,
            "_seq": self._next_seq(),
        }
        self._organizations[organization["id"]] = organization
        return organization

    def _organization_changes(self, organization: dict, body: dict) -> dict:
        changes = {}
        if body.get("name") is not None:
            changes["name"] = _required_name(body)
        slug = _optional_str(body, "slug")
        if slug is not None and slug != organization["slug"]:
            _check_slug(slug)
            if self._find_by_slug(slug) is not None:
                raise _identifier_exists("slug", slug)
            changes["slug"] = slug
        for field, read in (
            ("max_allowed_memberships", _optional_int),
            ("admin_delete_enabled", _optional_bool),
            ("public_metadata", _optional_dict),
            ("private_metadata", _optional_dict),
        ):
            value = read(body, field)
            if value is not None:
                changes[field] = value
        return changes

    def _organization_matches(
        self,
        organization: dict,
        query: str | None,
        user_ids: Sequence[str],
        organization_ids: Sequence[str],
    ) -> bool:
        if organization_ids and not _matches_id_filter(
            organization["id"], organization_ids
        ):
            return False
        if user_ids:
            members = [u for (o, u) in self._memberships if o == organization["id"]]
            if not any(_matches_id_filter(u, user_ids) for u in members):
                return False
        if not query:
            return True
        needle = query.lower()
        return (
            organization["id"] == query
            or needle in organization["name"].lower()
            or needle in organization["slug"].lower()
        )

    def _user_matches(
        self,
        user: dict,
        user_ids: Sequence[str],
        organization_ids: Sequence[str],
        email_addresses: Sequence[str],
        external_ids: Sequence[str],
    ) -> bool:
        if user_ids and not _matches_id_filter(user["id"], user_ids):
            return False
        if external_ids and user["external_id"] not in external_ids:
            return False
        if email_addresses:
            emails = {e["email_address"] for e in user["email_addresses"]}
            if not emails & {e.lower() for e in email_addresses}:
                return False
        if organization_ids:
            orgs = [o for (o, u) in self._memberships if u == user["id"]]
            if not any(_matches_id_filter(o, organization_ids) for o in orgs):
                return False
        return True

    def _check_user_identifiers(
        self, emails: list[str], external_id: str | None
    ) -> None:
        emails_in_use = {
            email["email_address"]
            for user in self._users.values()
            for email in user["email_addresses"]
        }
        for email in emails:
            if email in emails_in_use:
                raise _identifier_exists("email_address", email)
        if external_id is not None and any(
            u["external_id"] == external_id for u in self._users.values()
        ):
            raise _identifier_exists("external_id", external_id)

    def _count_members(self, organization_id: str) -> int:
        return sum(1 for (org_id, _) in self._memberships if org_id == organization_id)

    def _add_membership(
        self, organization: dict, user_id: str, role: str, public_metadata: dict
    ) -> dict:
        now = _now_ms()
        membership = {
            "id": _new_id("orgmem_"),
            "role": role,
            "public_metadata": public_metadata,
            "private_metadata": {},
            "organization_id": organization["id"],
            "user_id": user_id,
            "created_at": now,
            "updated_at": now,
            "_seq": self._next_seq(),
        }
        self._memberships[(organization["id"], user_id)] = membership
        return membership

    def _render_organization(self, organization: dict, members_count: bool) -> dict:
        rendered = _public(organization)
        rendered.pop("members_count", None)
        if members_count:
            rendered["members_count"] = self._count_members(organization["id"])
        return rendered

    def _render_membership(self, membership: dict) -> dict:
        organization = self._organizations[membership["organization_id"]]
        user = self._users[membership["user_id"]]
        return {
            "id": membership["id"],
            "object": "organization_membership",
            "role": membership["role"],
            "role_name": ROLE_NAMES[membership["role"]],
            "permissions": list(ROLE_PERMISSIONS[membership["role"]]),
            "public_metadata": copy.deepcopy(membership["public_metadata"]),
            "private_metadata": copy.deepcopy(membership["private_metadata"]),
            "organization": self._render_organization(organization, False),
            "public_user_data": _public_user_data(user),
            "created_at": membership["created_at"],
            "updated_at": membership["updated_at"],
        }


# The User fields the stand-in keeps at their value for a new user without
# phone numbers, passkeys, external accounts or multi-factor authentication.
_EMPTY_USER_FIELDS = {
    "phone_numbers": [],
    "web3_wallets": [],
    "passkeys": [],
    "password_enabled": False,
    "two_factor_enabled": False,
    "totp_enabled": False,
    "backup_code_enabled": False,
    "mfa_enabled_at": None,
    "mfa_disabled_at": None,
    "external_accounts": [],
    "saml_accounts": [],
    "enterprise_accounts": [],
    "last_sign_in_at": None,
    "banned": False,
    "locked": False,
    "lockout_expires_in_seconds": None,
    "verification_attempts_remaining": None,
    "delete_self_enabled": True,
    "create_organization_enabled": True,
    "last_active_at": None,
    "legal_accepted_at": None,
}


def _public(record: dict) -> dict:
    """Return a deep copy of `record` without the stand-in's private `_` fields."""
    return {
        key: copy.deepcopy(value)
        for key, value in record.items()
        if not key.startswith("_")
    }


def _email_address(email: str, now: int) -> dict:
    return {
        "id": _new_id("idn_"),
        "object": "email_address",
        "email_address": email,
        "reserved": False,
        "verification": {
            "object": "verification_admin",
            "status": "verified",
            "strategy": "admin",
            "attempts": None,
            "expire_at": None,
        },
        "linked_to": [],
        "created_at": now,
        "updated_at": now,
    }


def _public_user_data(user: dict) -> dict:
    emails = user["email_addresses"]
    return {
        "user_id": user["id"],
        "first_name": user["first_name"],
        "last_name": user["last_name"],
        "profile_image_url": None,
        "image_url": "",
        "has_image": False,
        "identifier": emails[0]["email_address"] if emails else user["username"],
        "username": user["username"],
    }


def _user_matches_query(user: dict, query: str | None) -> bool:
    if not query:
        return True
    needle = query.lower()
    values = [user["id"], user["first_name"], user["last_name"], user["username"]]
    values += [e["email_address"] for e in user["email_addresses"]]
    return any(needle in value.lower() for value in values if value)


def _check_role(role: object) -> None:
    if role not in ROLE_PERMISSIONS:
        raise _param_invalid("role", f"use one of {', '.join(ROLE_PERMISSIONS)}")


def _check_slug(slug: str) -> None:
    if not _SLUG_PATTERN.match(slug):
        raise _param_invalid(
            "slug", "use only lowercase letters, digits and single dashes"
        )


def _required_name(body: dict) -> str:
    name = _optional_str(body, "name")
    if name is None or not name.strip():
        raise _param_missing("name")
    if len(name) > MAX_NAME_LENGTH:
        raise _param_invalid("name", f"the maximum length is {MAX_NAME_LENGTH}")
    return name


def _required_str(body: dict, name: str) -> str:
    value = _optional_str(body, name)
    if value is None:
        raise _param_missing(name)
    return value


def _optional_str(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise _param_invalid(name, "expected a string")
    return value


def _optional_int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _param_invalid(name, "expected a non-negative integer")
    return value


def _optional_bool(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _param_invalid(name, "expected true or false")
    return value


def _optional_dict(body: dict, name: str) -> dict | None:
    value = body.get(name)
    if value is not None and not isinstance(value, dict):
        raise _param_invalid(name, "expected a JSON object")
    return value


def _optional_str_list(body: dict, name: str) -> list[str]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _param_invalid(name, "expected a list of strings")
    return value


# HTTP layer


Handler = Callable[[Request], Awaitable[JSONResponse]]


class _SlidingWindowLimiter:
    """Admit at most `limit` requests in any `window` seconds."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._admitted: collections.deque[float] = collections.deque()

    def retry_after(self) -> int | None:
        """Admit a request and return None, or return whole seconds to wait."""
        now = time.monotonic()
        while self._admitted and now - self._admitted[0] >= self.window:
            self._admitted.popleft()
        if len(self._admitted) < self.limit:
            self._admitted.append(now)
            return None
        wait = self._admitted[0] + self.window - now
        return max(1, math.ceil(wait))


class _ClerkService:
    """The HTTP side of the stand-in: key check, rate limits, faults, counters.

    Handlers run on the server's event loop and never await while changing the
    counters, so only ClerkState needs a lock.
    """

    def __init__(
        self,
        secret_key: str,
        faults: frozenset[str],
        rate_limit: int | None,
    ) -> None:
        self.state = ClerkState()
        self._expected_authorization = f"Bearer {secret_key}".encode()
        self._faults = faults
        self._limiter = (
            _SlidingWindowLimiter(rate_limit, RATE_LIMIT_WINDOW_SECONDS)
            if rate_limit is not None
            else None
        )
        self._gated_requests = 0
        self._by_route: collections.Counter[str] = collections.Counter()
        self._by_status: collections.Counter[str] = collections.Counter()

    def api_route(self, method: str, path: str, handler: Handler) -> Route:
        """Build a `/v1` route that checks the key and limits before `handler`."""
        route_name = f"{method} /v1{path}"

        async def endpoint(request: Request) -> JSONResponse:
            response = await self._serve(request, handler)
            self._by_route[route_name] += 1
            self._by_status[str(response.status_code)] += 1
            return response

        return Route(f"/v1{path}", endpoint, methods=[method])

    async def _serve(self, request: Request, handler: Handler) -> JSONResponse:
        try:
            self._check_authorization(request)
            self._check_rate_limits()
            return await handler(request)
        except ClerkAPIError as error:
            logger.info(
                "clerk request rejected: %s %s status=%s code=%s",
                request.method,
                request.url.path,
                error.status_code,
                error.code,
            )
            return _error_response(error)

    def _check_authorization(self, request: Request) -> None:
        received = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(received, self._expected_authorization):
            raise ClerkAPIError(
                401,
                "authentication_invalid",
                "Invalid authentication",
                "The request has no valid secret key. Send it as "
                "'Authorization: Bearer <secret key>'.",
            )

    def _check_rate_limits(self) -> None:
        """Apply the `clerk-rate-limited` fault, then the configured limit."""
        self._gated_requests += 1
        if "clerk-rate-limited" in self._faults and self._gated_requests % 3 == 0:
            raise _RateLimited(FAULT_RETRY_AFTER_SECONDS)
        if self._limiter is not None:
            wait = self._limiter.retry_after()
            if wait is not None:
                raise _RateLimited(wait)

    def stats(self) -> dict:
        return {
            "requests": sum(self._by_route.values()),
            "by_route": dict(self._by_route),
            "by_status": dict(self._by_status),
        }


class _RateLimited(ClerkAPIError):
    """A 429 that carries the seconds for its `Retry-After` header."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            429,
            "too_many_requests",
            "Too many requests",
            f"The rate limit was exceeded. Retry after {retry_after} s.",
        )
        self.retry_after = retry_after


def _error_response(error: ClerkAPIError) -> JSONResponse:
    headers = {}
    if isinstance(error, _RateLimited):
        headers["Retry-After"] = str(error.retry_after)
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=headers)


async def _read_body(request: Request) -> dict:
    """Return the JSON object in the body, or {} for an empty body."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ClerkAPIError(
            400,
            "request_body_invalid",
            "is invalid",
            "The request body must be a JSON object.",
        )
    return body


def _int_query(request: Request, name: str, default: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _param_invalid(name, f"{raw!r} is not an integer") from None
    if not 0 <= value <= maximum:
        raise _param_invalid(name, f"use a value from 0 to {maximum}")
    return value


def _bool_query(request: Request, name: str) -> bool:
    return request.query_params.get(name, "false").lower() == "true"


def _page_query(request: Request) -> dict:
    return {
        "limit": _int_query(request, "limit", 10, MAX_PAGE_LIMIT),
        "offset": _int_query(request, "offset", 0, 10**9),
    }


class _APIHandlers:
    """The `/v1` handlers: each parses the request, calls ClerkState and replies."""

    def __init__(self, state: ClerkState, faults: frozenset[str]) -> None:
        self.state = state
        self.faults = faults

    async def list_organizations(self, request: Request) -> JSONResponse:
        params = request.query_params
        return JSONResponse(
            self.state.list_organizations(
                query=params.get("query"),
                user_ids=params.getlist("user_id"),
                organization_ids=params.getlist("organization_id"),
                order_by=params.get("order_by", "-created_at"),
                include_members_count=_bool_query(request, "include_members_count"),
                **_page_query(request),
            )
        )

    async def create_organization(self, request: Request) -> JSONResponse:
        body = await _read_body(request)
        return JSONResponse(self.state.create_organization(body))

    async def get_organization(self, request: Request) -> JSONResponse:
        organization_id = request.path_params["organization_id"]
        return JSONResponse(self.state.get_organization(organization_id))

    async def update_organization(self, request: Request) -> JSONResponse:
        organization_id = request.path_params["organization_id"]
        body = await _read_body(request)
        return JSONResponse(self.state.update_organization(organization_id, body))

    async def delete_organization(self, request: Request) -> JSONResponse:
        organization_id = request.path_params["organization_id"]
        return JSONResponse(self.state.delete_organization(organization_id))

    async def merge_metadata(self, request: Request) -> JSONResponse:
        organization_id = request.path_params["organization_id"]
        body = await _read_body(request)
        organization = self.state.merge_organization_metadata(organization_id, body)
        return JSONResponse(organization)

    async def replace_metadata(self, request: Request) -> JSONResponse:
        organization_id = request.path_params["organization_id"]
        body = await _read_body(request)
        organization = self.state.replace_organization_metadata(organization_id, body)
        return JSONResponse(organization)

    async def list_memberships(self, request: Request) -> JSONResponse:
        params = request.query_params
        return JSONResponse(
            self.state.list_memberships(
                request.path_params["organization_id"],
                user_ids=params.getlist("user_id"),
                roles=params.getlist("role"),
                order_by=params.get("order_by", "-created_at"),
                **_page_query(request),
            )
        )

    async def create_membership(self, request: Request) -> JSONResponse:
        body = await _read_body(request)
        membership = self.state.create_membership(
            request.path_params["organization_id"],
            _required_str(body, "user_id"),
            _required_str(body, "role"),
            _optional_dict(body, "public_metadata"),
        )
        return JSONResponse(membership)

    async def update_membership(self, request: Request) -> JSONResponse:
        body = await _read_body(request)
        membership = self.state.update_membership(
            request.path_params["organization_id"],
            request.path_params["user_id"],
            _required_str(body, "role"),
        )
        return JSONResponse(membership)

    async def delete_membership(self, request: Request) -> JSONResponse:
        membership = self.state.delete_membership(
            request.path_params["organization_id"], request.path_params["user_id"]
        )
        return JSONResponse(membership)

    async def list_users(self, request: Request) -> JSONResponse:
        params = request.query_params
        users = self.state.list_users(
            user_ids=params.getlist("user_id"),
            organization_ids=params.getlist("organization_id"),
            email_addresses=params.getlist("email_address"),
            external_ids=params.getlist("external_id"),
            query=params.get("query"),
            order_by=params.get("order_by", "-created_at"),
            **_page_query(request),
        )
        return JSONResponse(users)

    async def create_user(self, request: Request) -> JSONResponse:
        body = await _read_body(request)
        return JSONResponse(self.state.create_user(body))

    async def get_user(self, request: Request) -> JSONResponse:
        return JSONResponse(self.state.get_user(request.path_params["user_id"]))

    async def list_sessions(self, request: Request) -> JSONResponse:
        params = request.query_params
        sessions = self.state.list_sessions(
            user_id=params.get("user_id"),
            client_id=params.get("client_id"),
            status=params.get("status"),
            **_page_query(request),
        )
        return JSONResponse(sessions)

    async def create_session(self, request: Request) -> JSONResponse:
        body = await _read_body(request)
        session = self.state.create_session(
            _required_str(body, "user_id"),
            _optional_str(body, "active_organization_id"),
        )
        return JSONResponse(session)

    async def get_session(self, request: Request) -> JSONResponse:
        session_id = request.path_params["session_id"]
        return JSONResponse(self.state.get_session(session_id))

    async def revoke_session(self, request: Request) -> JSONResponse:
        session_id = request.path_params["session_id"]
        persist = "session-survives-revoke" not in self.faults
        return JSONResponse(self.state.revoke_session(session_id, persist=persist))


_API_ROUTES = [
    ("GET", "/organizations", "list_organizations"),
    ("POST", "/organizations", "create_organization"),
    ("GET", "/organizations/{organization_id}", "get_organization"),
    ("PATCH", "/organizations/{organization_id}", "update_organization"),
    ("DELETE", "/organizations/{organization_id}", "delete_organization"),
    ("PATCH", "/organizations/{organization_id}/metadata", "merge_metadata"),
    ("PUT", "/organizations/{organization_id}/metadata", "replace_metadata"),
    ("GET", "/organizations/{organization_id}/memberships", "list_memberships"),
    ("POST", "/organizations/{organization_id}/memberships", "create_membership"),
    (
        "PATCH",
        "/organizations/{organization_id}/memberships/{user_id}",
        "update_membership",
    ),
    (
        "DELETE",
        "/organizations/{organization_id}/memberships/{user_id}",
        "delete_membership",
    ),
    ("GET", "/users", "list_users"),
    ("POST", "/users", "create_user"),
    ("GET", "/users/{user_id}", "get_user"),
    ("GET", "/sessions", "list_sessions"),
    ("POST", "/sessions", "create_session"),
    ("GET", "/sessions/{session_id}", "get_session"),
    ("POST", "/sessions/{session_id}/revoke", "revoke_session"),
]


def _sandbox_routes(service: _ClerkService) -> list[Route]:
    """Build the key-less `/sandbox` routes, which the counters leave out."""

    async def create_session(request: Request) -> JSONResponse:
        try:
            body = await _read_body(request)
            session = service.state.create_session(
                _required_str(body, "user_id"), _optional_str(body, "organization_id")
            )
        except ClerkAPIError as error:
            logger.info(
                "clerk sandbox session rejected: status=%s code=%s",
                error.status_code,
                error.code,
            )
            return _error_response(error)
        return JSONResponse(session)

    async def get_state(request: Request) -> JSONResponse:
        return JSONResponse(service.state.snapshot())

    async def get_stats(request: Request) -> JSONResponse:
        return JSONResponse(service.stats())

    return [
        Route("/sandbox/sessions", create_session, methods=["POST"]),
        Route("/sandbox/state", get_state, methods=["GET"]),
        Route("/sandbox/stats", get_stats, methods=["GET"]),
    ]


def create_clerk_app(
    secret_key: str,
    *,
    faults: set[str] | frozenset[str] = frozenset(),
    rate_limit: int | None = None,
) -> Starlette:
    """Create the Backend API stand-in that accepts `secret_key` only.

    `faults` contains names from CLERK_FAULTS, and an unknown name raises
    UnknownFaultError. `rate_limit`, when set, is the number of `/v1` requests
    admitted in any 10 s. The store is `app.state.clerk`.
    """
    if not secret_key:
        raise ValueError("secret_key must not be empty")
    unknown = sorted(set(faults) - set(CLERK_FAULTS))
    if unknown:
        known = ", ".join(sorted(CLERK_FAULTS))
        raise UnknownFaultError(
            f"unknown Clerk fault {unknown[0]!r}. Known Clerk faults: {known}"
        )
    if rate_limit is not None and rate_limit < 1:
        raise ValueError(
            f"rate_limit must be a positive number or None, not {rate_limit}"
        )

    service = _ClerkService(secret_key, frozenset(faults), rate_limit)
    handlers = _APIHandlers(service.state, frozenset(faults))
    routes = [
        service.api_route(method, path, getattr(handlers, name))
        for method, path, name in _API_ROUTES
    ]
    app = Starlette(routes=routes + _sandbox_routes(service))
    app.state.clerk = service.state
    return app
