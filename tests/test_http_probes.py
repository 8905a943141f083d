"""Classification of probe responses and the row sampling of export bodies."""

from __future__ import annotations

import httpx
import pytest

from tasks.http_access import other_org_for, path_variants, summarize_gate
from tasks.http_probes import Probe, classify, count_row_orgs, probe_url

CASES = [
    (401, "", True, "GET", "unauthenticated"),
    (403, "", True, "GET", "rejected"),
    (404, "", True, "GET", "rejected"),
    (302, "https://ue.example/sign-in?redirect=/x", False, "GET", "rejected"),
    (307, "/login", False, "GET", "rejected"),
    (307, "/api/v2/rewards/export", False, "GET", "redirected"),
    (200, "", True, "GET", "allowed"),
    (200, "", False, "HEAD", "allowed"),
    (204, "", False, "OPTIONS", "rejected"),
    (200, "", True, "OPTIONS", "allowed"),
    (500, "", True, "GET", "error"),
]


@pytest.mark.parametrize(
    "status,location,body,method,expected",
    CASES,
    ids=[f"{c[3]}-{c[0]}-{c[4]}" for c in CASES],
)
def test_classify(status, location, body, method, expected):
    """Each response maps to the outcome its gate check expects."""
    assert classify(status, location, body, method) == expected


def test_csv_rows_counted_by_org():
    """CSV rows are counted per value of the org column."""
    body = b"id,org_id,points\n1,org_a,5\n2,org_a,6\n3,org_b,1\n"
    assert count_row_orgs(body, "text/csv", "org_id") == {"org_a": 2, "org_b": 1}


def test_csv_with_bom_counted():
    """A UTF-8 byte order mark does not hide the org column."""
    body = "\ufeffid,org_id\n1,org_a\n".encode()
    assert count_row_orgs(body, "text/csv", "org_id") == {"org_a": 1}


def test_paged_json_rows_counted():
    """Rows of a DRF page are counted per org."""
    body = (
        b'{"count": 2, "next": null, "previous": null, "results": '
        b'[{"org_id": "org_a"}, {"org_id": "org_b"}]}'
    )
    assert count_row_orgs(body, "application/json", "org_id") == {
        "org_a": 1,
        "org_b": 1,
    }


def test_html_body_counts_nothing():
    """An HTML page served for an export route yields no rows."""
    assert count_row_orgs(b"<html>sign in</html>", "text/html", "org_id") == {}


def test_path_variants_differ_from_path():
    """Every spelling variant differs from the canonical path."""
    path = "/api/v2/rewards/export"
    variants = path_variants(path)
    assert path not in variants
    assert len(set(variants)) == len(variants)


def test_login_redirect_with_session_is_unauthenticated():
    """A session redirected to sign-in was not accepted by the server."""
    assert (
        classify(302, "/sign-in", False, "GET", with_session=True) == "unauthenticated"
    )


def test_redirect_elsewhere_is_inconclusive():
    """A redirect to anything but a login page does not prove the gate closed."""
    probe = Probe(
        "GET", "/api/v2/rewards/export", 302, "redirected", "/downloads/org_a.csv"
    )
    check = summarize_gate("access.export_requires_auth", [probe], None, "closed")
    assert check.status.value == "inconclusive"


def test_no_probes_is_inconclusive():
    """A gate check with nothing probed proves nothing."""
    check = summarize_gate("access.cross_org_requires_auth", [], None, "closed")
    assert check.status.value == "inconclusive"


def test_raw_paths_sent_unchanged():
    """Double slashes and encoded dots reach the server as written."""
    client = httpx.AsyncClient(base_url="http://127.0.0.1:9")
    for path in ("//api/v2/rewards/export", "/api/v2/%2e/rewards/export"):
        assert (
            probe_url(client, path, {"orgId": "org_a"}).raw_path
            == (path + "?orgId=org_a").encode()
        )


def test_huge_csv_field_counts_nothing():
    """A field over the csv module's limit yields no counts instead of an error."""
    body = b"id,org_id,notes\n1,org_a," + b"x" * 200_000 + b"\n"
    assert count_row_orgs(body, "text/csv", "org_id") == {}


def test_cut_last_line_dropped():
    """A body that ends inside a record does not count the partial record."""
    body = b"id,org_id\n1,org_a\n2,org_"
    assert count_row_orgs(body, "text/csv", "org_id") == {"org_a": 1}


@pytest.mark.parametrize(
    "orgs,pilot,expected",
    [
        (["org_a", "org_b"], [], "org_b"),
        (["org_a"], ["org_c", "org_a", "org_b"], "org_c"),
        (["org_a"], [], "org_b"),
        (["org_b"], ["org_b"], "org_a"),
        (["org_a"], ["org_x"], "org_b"),
    ],
    ids=["next-audited", "pilot-org", "any-session", "only-other",
         "pilot-without-session"],
)
def test_other_org_single_org_audit(orgs, pilot, expected):
    """One audited org borrows another org's probe session for the cross-org gate."""
    sessions = {"org_a": {"admin": "t1"}, "org_b": {"member": "t2"},
                "org_c": {"admin": "t3"}}
    if expected == "org_a":
        sessions.pop("org_c")
    if "org_x" in pilot:
        sessions.pop("org_c")
    assert other_org_for(orgs[0], orgs, 0, sessions, pilot) == expected


def test_other_org_without_session():
    """Without another org's session there is no other org."""
    assert other_org_for("org_a", ["org_a"], 0, {"org_a": {"admin": "t"}}, []) is None
