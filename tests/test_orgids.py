"""Org id validation, which runs before any request, query or blob path."""

from __future__ import annotations

import pytest

from ue_pilot.orgids import InvalidOrgIdError, validate_org_id

BAD_IDS = [
    ("", "empty"),
    ("   ", "empty"),
    ("..", "not allowed"),
    ("org_a/../org_b", "not allowed"),
    ("org_*", "not allowed"),
    ("org_?", "not allowed"),
    ("org_" + "a" * 100, "maximum"),
    ("org-with-dash", "does not match"),
    (None, "empty"),
]


@pytest.mark.parametrize("org_id,message", BAD_IDS, ids=[m for _, m in BAD_IDS])
def test_bad_org_id_rejected(org_id, message):
    """Empty, path-like, wildcard, over-long and malformed ids are rejected."""
    with pytest.raises(InvalidOrgIdError, match=message):
        validate_org_id(org_id)


def test_clerk_org_id_accepted():
    """A Clerk-style org id passes unchanged."""
    assert validate_org_id("org_2abcDEF123") == "org_2abcDEF123"


def test_permissive_pattern_still_rejects_dots():
    """A pattern that admits anything still cannot admit '..'."""
    with pytest.raises(InvalidOrgIdError):
        validate_org_id("..", pattern=r".*")
