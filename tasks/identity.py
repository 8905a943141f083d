"""What the flows do to the identity provider, Clerk, through its Backend API SDK.

Clerk has no disable for an organization, so the pilot status lives in the
org's public metadata under `UE_CLERK_STATUS_KEY`, which UE honours. Nothing
here deletes an organization or a membership: they are the audit trail.
"""

from __future__ import annotations

from datetime import UTC, datetime

from clerk_backend_api import Clerk, models

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
    """Return the organization, or None when Clerk answers 404."""
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
