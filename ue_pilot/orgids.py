"""Validation of organization ids before they reach a URL, a query or a blob path."""

from __future__ import annotations

import re

MAX_ORG_ID_LENGTH = 64


class InvalidOrgIdError(ValueError):
    """An org id that is empty, too long, or not of the configured form."""


def validate_org_id(org_id: object, pattern: str = r"^org_[A-Za-z0-9]{1,60}$") -> str:
    """Return `org_id` unchanged if it is a safe org id, else raise InvalidOrgIdError.

    The length, path and wildcard checks run before the pattern, so a permissive
    pattern in the settings cannot admit `..`, `*` or a path separator.
    """
    if not isinstance(org_id, str) or not org_id.strip():
        raise InvalidOrgIdError(
            f"invalid org id {org_id!a}: it is empty; pass a Clerk org id such as "
            "org_2abc123"
        )
    if len(org_id) > MAX_ORG_ID_LENGTH:
        raise InvalidOrgIdError(
            f"invalid org id {org_id[:20]!a}... ({len(org_id)} characters): the "
            f"maximum is {MAX_ORG_ID_LENGTH}"
        )
    if any(mark in org_id for mark in ("..", "/", "\\", "*", "?", "%", "[", "]")):
        raise InvalidOrgIdError(
            f"invalid org id {org_id!a}: path separators, '..' and wildcards are "
            "not allowed; pass one exact org id"
        )
    if not re.fullmatch(pattern, org_id):
        raise InvalidOrgIdError(
            f"invalid org id {org_id!a}: it does not match UE_ORG_ID_PATTERN "
            f"{pattern!r}; check the id or change the pattern"
        )
    return org_id
