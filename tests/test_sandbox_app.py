"""The Union-Eyes stand-in over real HTTP on 127.0.0.1, backed by real PostgreSQL."""

from __future__ import annotations

import csv
import io
from datetime import datetime

import httpx
import pytest

from ue_pilot.sandbox.app import SessionRegistry, create_ue_app
from ue_pilot.sandbox.database import SandboxDatabase
from ue_pilot.sandbox.servers import RunningServer, start_server
from ue_pilot.sandbox.telemetry import TelemetryStore

ORGS = ["org_alpha01", "org_bravo02", "org_charlie03"]
REWARDS = "/api/v2/rewards/export"
TAX = "/api/v2/tax/cra/export"
CROSS_ORG = "/api/analytics/cross-org"
CROSS_TENANT = "/api/analytics/cross-tenant"
PROTECTED = [REWARDS, TAX, CROSS_ORG, CROSS_TENANT]


class Sandbox:
    """One running app instance with its sessions, telemetry store and client."""

    def __init__(self, server: RunningServer, sessions: SessionRegistry, store):
        self.server = server
        self.sessions = sessions
        self.store = store
        self.client = httpx.Client(base_url=server.url, timeout=10)

    def token(self, org_id: str | None = "org_alpha01", role: str = "member") -> str:
        return self.sessions.issue(org_id, role)

    def get(self, path: str, token: str | None = None, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.client.get(path, headers=headers, **kwargs)

    def raw(self, method: str, target: str, **kwargs) -> httpx.Response:
        """Send `target` exactly as written; httpx would remove `.` and `..`."""
        return self.client.request(
            method, "/", extensions={"target": target.encode()}, **kwargs
        )

    def events(self, name: str) -> list[dict]:
        _, rows = self.store.query(
            f'customEvents | where name == "{name}" | project customDimensions',
            None,
            None,
        )
        return [row[0] for row in rows]

    def metrics(self, name: str) -> list[tuple[float, dict]]:
        _, rows = self.store.query(
            f'customMetrics | where name == "{name}" | project value, customDimensions',
            None,
            None,
        )
        return [(row[0], row[1]) for row in rows]


@pytest.fixture(scope="module")
def database(request) -> SandboxDatabase:
    database = SandboxDatabase.create(org_ids=ORGS, faults=set())
    request.addfinalizer(database.drop)
    return database


@pytest.fixture(scope="module")
def leaky_database(request) -> SandboxDatabase:
    """A database whose rewards table leaks every org, so exports span pages."""
    database = SandboxDatabase.create(org_ids=ORGS, faults={"rls-not-forced"})
    request.addfinalizer(database.drop)
    return database


@pytest.fixture(scope="module")
def start(request, database, leaky_database):
    """Start app instances on demand; every one is stopped at module end."""
    running: list[Sandbox] = []

    def start_app(database: SandboxDatabase, *faults: str, **options) -> Sandbox:
        sessions = SessionRegistry()
        store = TelemetryStore()
        app = create_ue_app(
            app_url=database.app_url,
            tenant_setting=database.tenant_setting,
            sessions=sessions,
            telemetry=store,
            faults=set(faults),
            org_ids=database.org_ids,
            **options,
        )
        sandbox = Sandbox(start_server(app), sessions, store)
        running.append(sandbox)
        return sandbox

    def stop_all() -> None:
        for sandbox in running:
            sandbox.client.close()
            sandbox.server.stop()

    request.addfinalizer(stop_all)
    return start_app


@pytest.fixture(scope="module")
def clean(start, database) -> Sandbox:
    return start(database)


def csv_rows(response: httpx.Response) -> list[dict]:
    """Parse a CSV export; utf-8-sig drops the byte order mark it starts with."""
    text = response.content.decode("utf-8-sig")
    return list(csv.DictReader(io.StringIO(text, newline="")))


# Health and readiness.


def test_health_ok(clean):
    """The health route responds with 200 with status ok."""
    response = clean.get("/api/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_health_fields(clean):
    """The health body has the fields of the real application."""
    body = clean.get("/api/health").json()
    assert set(body) == {"status", "app", "buildInfo", "checks", "timestamp"}


def test_health_database_check(clean):
    """The health body reports the database check."""
    assert clean.get("/api/health").json()["checks"] == {"database": "ok"}


def test_health_timestamp_iso(clean):
    """The health timestamp is ISO 8601."""
    timestamp = clean.get("/api/health").json()["timestamp"]
    assert datetime.fromisoformat(timestamp).tzinfo is not None


def test_health_degraded_without_database(start):
    """The health route responds with 503 degraded once its database is gone."""
    database = SandboxDatabase.create(org_ids=ORGS[:1], faults=set())
    try:
        sandbox = start(database)
    finally:
        database.drop()
    response = sandbox.get("/api/health")
    assert response.status_code == 503
    assert response.json()["status"] == "degraded"


def test_ready_ok(clean):
    """The readiness route responds with 200 ready."""
    response = clean.get("/api/ready")
    assert response.status_code == 200
    assert response.json() == {"ready": True}


def test_ready_down_fault(start, database):
    """Fault readiness-down makes the readiness route respond with 503."""
    sandbox = start(database, "readiness-down")
    response = sandbox.get("/api/ready")
    assert response.status_code == 503
    assert response.json() == {"ready": False}


def test_ready_requires_auth_fault(start, database):
    """Fault ready-requires-auth rejects an anonymous probe with 401."""
    sandbox = start(database, "ready-requires-auth")
    assert sandbox.get("/api/ready").status_code == 401
    assert sandbox.get("/api/ready", sandbox.token()).status_code == 200


# Exports.


@pytest.mark.parametrize("path", [REWARDS, TAX])
def test_export_anonymous_401(clean, path):
    """An export without a session responds with 401 with the unauthenticated error."""
    response = clean.get(path, params={"orgId": "org_alpha01"})
    assert response.status_code == 401
    assert response.json() == {"error": "unauthenticated"}


def test_export_invalid_token_401(clean):
    """An unknown bearer token responds with 401."""
    assert clean.get(REWARDS, "not-a-session").status_code == 401


def test_export_malformed_header_401(clean):
    """An Authorization header of another scheme responds with 401."""
    response = clean.get(REWARDS, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert response.status_code == 401


def test_export_csv_own_org(clean):
    """A member's CSV export contains the 50 rewards of their org only."""
    response = clean.get(REWARDS, clean.token(), params={"orgId": "org_alpha01"})
    rows = csv_rows(response)
    assert response.status_code == 200
    assert len(rows) == 50
    assert {row["org_id"] for row in rows} == {"org_alpha01"}


def test_export_csv_header(clean):
    """The tax export CSV starts with a header row that names org_id."""
    response = clean.get(TAX, clean.token(), params={"orgId": "org_alpha01"})
    header = response.content.decode("utf-8-sig").splitlines()[0].split(",")
    assert header == [
        "id",
        "org_id",
        "member_id",
        "tax_year",
        "slip_type",
        "amount",
        "sin_last3",
    ]


def test_export_csv_ordered_by_id(clean):
    """Export rows come ordered by id."""
    rows = csv_rows(clean.get(TAX, clean.token()))
    ids = [row["id"] for row in rows]
    assert ids == sorted(ids)


def test_export_session_cookie(clean):
    """The __session cookie authenticates like a bearer token."""
    token = clean.token("org_bravo02")
    clean.client.cookies.set("__session", token)
    try:
        response = clean.client.get(TAX)
    finally:
        clean.client.cookies.clear()
    assert response.status_code == 200
    assert {row["org_id"] for row in csv_rows(response)} == {"org_bravo02"}


def test_export_defaults_to_session_org(clean):
    """Without orgId the export serves the session's org."""
    rows = csv_rows(clean.get(REWARDS, clean.token("org_charlie03")))
    assert {row["org_id"] for row in rows} == {"org_charlie03"}


def test_export_other_org_403(clean):
    """A session of one org asking for another org's rows gets 403."""
    response = clean.get(REWARDS, clean.token(), params={"orgId": "org_bravo02"})
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"


def test_export_403_has_trace_id(clean):
    """The 403 response carries an x-trace-id header."""
    response = clean.get(TAX, clean.token(), params={"orgId": "org_bravo02"})
    assert len(response.headers.get("x-trace-id", "")) == 32


def test_export_repeated_org_400(clean):
    """A repeated orgId is rejected, so the check and the query read the same org."""
    response = clean.get(
        REWARDS,
        clean.token(),
        params=[("orgId", "org_alpha01"), ("orgId", "org_bravo02")],
    )
    assert response.status_code == 400


def test_export_invalid_org_400(clean):
    """An orgId that is not an org id responds with 400."""
    response = clean.get(REWARDS, clean.token(), params={"orgId": "org_../x"})
    assert response.status_code == 400


def test_export_invalid_format_400(clean):
    """A format other than csv or json responds with 400."""
    response = clean.get(REWARDS, clean.token(), params={"format": "xml"})
    assert response.status_code == 400


def test_export_json_single_page(clean):
    """A JSON export of 50 rows is one page with no next or previous link."""
    body = clean.get(REWARDS, clean.token(), params={"format": "json"}).json()
    assert body["count"] == 50
    assert body["next"] is None
    assert body["previous"] is None
    assert len(body["results"]) == 50


def test_export_json_row_fields(clean):
    """A JSON row has the export columns, with the amount as a decimal string."""
    body = clean.get(TAX, clean.token(), params={"format": "json"}).json()
    row = body["results"][0]
    assert row["org_id"] == "org_alpha01"
    assert isinstance(row["amount"], str)


@pytest.fixture(scope="module")
def leaky(start, leaky_database) -> Sandbox:
    return start(leaky_database)


def test_export_json_first_page(leaky):
    """The first of two pages has 100 rows and an absolute next link to page 2."""
    body = leaky.get(REWARDS, leaky.token(), params={"format": "json"}).json()
    assert body["count"] == 150
    assert len(body["results"]) == 100
    assert body["next"] == f"{leaky.server.url}{REWARDS}?format=json&page=2"
    assert body["previous"] is None


def test_export_json_last_page(leaky):
    """The last page links back to page 1 without a page parameter."""
    params = {"orgId": "org_alpha01", "format": "json", "page": "2"}
    body = leaky.get(REWARDS, leaky.token(), params=params).json()
    assert len(body["results"]) == 50
    assert body["next"] is None
    assert body["previous"] == (
        f"{leaky.server.url}{REWARDS}?orgId=org_alpha01&format=json"
    )


def test_export_json_page_out_of_range(leaky):
    """A page past the last responds with 404 as Django REST framework does."""
    params = {"format": "json", "page": "3"}
    response = leaky.get(REWARDS, leaky.token(), params=params)
    assert response.status_code == 404


def test_export_json_page_not_number(clean):
    """A page that is not a positive number responds with 404."""
    params = {"format": "json", "page": "0"}
    assert clean.get(REWARDS, clean.token(), params=params).status_code == 404


def test_export_no_org_session_empty(clean):
    """A session without an active org gets an empty export."""
    rows = csv_rows(clean.get(REWARDS, clean.token(None)))
    assert rows == []


# Cross-org analytics.


@pytest.mark.parametrize("path", [CROSS_ORG, CROSS_TENANT])
def test_analytics_anonymous_401(clean, path):
    """An analytics route without a session responds with 401."""
    assert clean.get(path).status_code == 401


@pytest.mark.parametrize("path", [CROSS_ORG, CROSS_TENANT])
def test_analytics_member_403(clean, path):
    """A member below the admin role gets 403 with the role details."""
    response = clean.get(path, clean.token(role="member"))
    assert response.status_code == 403
    assert response.json() == {
        "error": "forbidden",
        "requiredRole": "admin",
        "actualRole": "member",
    }


def test_analytics_403_has_trace_id(clean):
    """The role gate's 403 carries an x-trace-id header."""
    response = clean.get(CROSS_ORG, clean.token(role="member"))
    assert "x-trace-id" in response.headers


@pytest.mark.parametrize("role", ["admin", "owner"])
def test_analytics_admin_200(clean, role):
    """Admins and owners get 200."""
    assert clean.get(CROSS_TENANT, clean.token(role=role)).status_code == 200


def test_analytics_counts(clean):
    """The analytics body contains the session org's counts and the org total."""
    body = clean.get(CROSS_ORG, clean.token("org_bravo02", "admin")).json()
    assert body["organizationCount"] == 3
    assert body["orgs"] == [
        {"orgId": "org_bravo02", "members": 20, "rewards": 50, "taxSlips": 20}
    ]


# Application faults.


@pytest.fixture(scope="module")
def no_auth(start, database) -> Sandbox:
    return start(database, "export-no-auth")


def test_no_auth_fault_serves_rows(no_auth):
    """Fault export-no-auth serves the requested org's rows without a session."""
    response = no_auth.get(TAX, params={"orgId": "org_charlie03"})
    assert response.status_code == 200
    assert {row["org_id"] for row in csv_rows(response)} == {"org_charlie03"}


def test_no_auth_fault_metric(no_auth):
    """Fault export-no-auth records ue_export_unauthenticated for the org."""
    no_auth.get(REWARDS, params={"orgId": "org_bravo02"})
    orgs = {dims["orgId"] for _, dims in no_auth.metrics("ue_export_unauthenticated")}
    assert "org_bravo02" in orgs


def test_no_auth_fault_keeps_role_gate(no_auth):
    """Fault export-no-auth leaves the analytics routes protected."""
    assert no_auth.get(CROSS_ORG).status_code == 401


def test_export_ignores_org_fault(start, database):
    """Fault export-ignores-org gives a member another org's rows."""
    sandbox = start(database, "export-ignores-org")
    response = sandbox.get(REWARDS, sandbox.token(), params={"orgId": "org_bravo02"})
    assert response.status_code == 200
    assert {row["org_id"] for row in csv_rows(response)} == {"org_bravo02"}


def test_ignores_org_fault_needs_session(start, database):
    """Fault export-ignores-org still rejects anonymous requests."""
    sandbox = start(database, "export-ignores-org")
    assert sandbox.get(REWARDS, params={"orgId": "org_bravo02"}).status_code == 401


def test_no_role_gate_fault(start, database):
    """Fault cross-org-no-role-gate lets a member through the analytics route."""
    sandbox = start(database, "cross-org-no-role-gate")
    assert sandbox.get(CROSS_ORG, sandbox.token(role="member")).status_code == 200


def test_no_role_gate_fault_needs_session(start, database):
    """Fault cross-org-no-role-gate still rejects anonymous requests."""
    sandbox = start(database, "cross-org-no-role-gate")
    assert sandbox.get(CROSS_TENANT).status_code == 401


@pytest.fixture(scope="module")
def session_set(start, database) -> Sandbox:
    """An app with fault rls-session-set and a pool of two connections."""
    return start(database, "rls-session-set", pool_max_size=2)


def test_session_set_fault_leaks(session_set):
    """Under rls-session-set a request without an org reads the previous org's rows."""
    token = session_set.token("org_bravo02")
    for _ in range(4):
        session_set.get(TAX, token)
    rows = csv_rows(session_set.get(TAX, session_set.token(None)))
    assert {row["org_id"] for row in rows} == {"org_bravo02"}


def test_session_set_fault_event(session_set):
    """The leaked query records rls_context_set with a foreign orgId."""
    token = session_set.token("org_charlie03")
    for _ in range(4):
        session_set.get(REWARDS, token)
    session_set.get(REWARDS, session_set.token(None))
    mismatches = [
        event
        for event in session_set.events("rls_context_set")
        if event["orgId"] != event["requestOrgId"]
    ]
    assert {event["requestOrgId"] for event in mismatches} == {""}
    assert "org_charlie03" in {event["orgId"] for event in mismatches}


def test_clean_app_no_leak_through_pool(start, database):
    """Without the fault a request without an org reads nothing after other requests."""
    sandbox = start(database, pool_max_size=2)
    token = sandbox.token("org_bravo02")
    for _ in range(4):
        sandbox.get(TAX, token)
    assert csv_rows(sandbox.get(TAX, sandbox.token(None))) == []


def test_no_telemetry_fault(start, database):
    """Fault no-telemetry makes the app record nothing."""
    sandbox = start(database, "no-telemetry")
    sandbox.get(REWARDS, sandbox.token())
    assert sum(sandbox.store.row_counts().values()) == 0


def test_request_delay(start, database):
    """request_delay_ms adds its delay to the recorded handling time."""
    sandbox = start(database, request_delay_ms=60)
    sandbox.get("/api/ready")
    latencies = [value for value, _ in sandbox.metrics("ue_django_proxy_latency_ms")]
    assert min(latencies) >= 60


# Bypass attempts on the clean app: none may serve data anonymously.


BYPASS_METHODS = ["HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@pytest.mark.parametrize("method", BYPASS_METHODS)
@pytest.mark.parametrize("path", PROTECTED)
def test_bypass_method(clean, method, path):
    """Another method on a protected route is rejected with 401."""
    response = clean.client.request(method, path, params={"orgId": "org_alpha01"})
    assert response.status_code == 401


BYPASS_PATHS = [
    "/api/v2/rewards/export/",
    "/API/V2/REWARDS/EXPORT",
    "/Api/v2/Tax/Cra/Export",
    "//api/v2/rewards/export",
    "/api//v2/tax/cra/export",
    "/api/v2/rewards/%65xport",
    "/api/v2/rewards/export%2F",
    "/api/v2/rewards%2Fexport",
    "/api/v2/rewards/export%252f",
    "/api/v2/rewards/export;.css",
    "/api/v2/tax/cra/export;jsessionid=1",
    "/api/v2/./rewards/export",
    "/api/v2/x/../rewards/export",
    "/api/v2/rewards/export%00",
    "/api/v2/rewards/export%20",
    "/api\\v2\\rewards\\export",
    "/api/analytics/cross-org/",
    "/api/analytics/CROSS-ORG",
    "/api/analytics/cross-tenant;x=1",
    "/api/analytics/./cross-tenant",
    "/api/analytics/cross%2Dorg",
]


@pytest.mark.parametrize("target", BYPASS_PATHS)
def test_bypass_path(clean, target):
    """Another spelling of a protected path is rejected with 401."""
    response = clean.raw("GET", f"{target}?orgId=org_alpha01&format=csv")
    assert response.status_code == 401


@pytest.mark.parametrize("target", BYPASS_PATHS)
def test_spelling_reaches_route(clean, target):
    """With a session each spelling reaches the route: the 401s come from the gate."""
    token = clean.token("org_alpha01", "admin")
    response = clean.raw(
        "GET",
        f"{target}?orgId=org_alpha01&format=csv",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200


BYPASS_HEADERS = [
    {"x-middleware-subrequest": ":".join(["middleware"] * 5)},
    {"x-middleware-subrequest": "src/middleware:src/middleware:src/middleware"},
    {"X-Original-URL": "/api/health"},
    {"X-Rewrite-URL": "/api/health"},
    {"X-Forwarded-For": "127.0.0.1"},
    {"X-Real-IP": "127.0.0.1"},
    {"X-Forwarded-Host": "localhost", "X-Forwarded-Proto": "https"},
]


@pytest.mark.parametrize(
    "headers", BYPASS_HEADERS, ids=lambda headers: ",".join(headers)
)
@pytest.mark.parametrize("path", PROTECTED)
def test_bypass_header(clean, headers, path):
    """Proxy and framework headers do not skip the session check."""
    response = clean.get(path, params={"orgId": "org_alpha01"}, headers=dict(headers))
    assert response.status_code == 401


@pytest.mark.parametrize("header", ["X-Original-URL", "X-Rewrite-URL"])
def test_rewrite_header_ignored(clean, header):
    """A public route with a rewrite header naming an export serves the public route."""
    response = clean.get(
        "/api/health", headers={header: REWARDS + "?orgId=org_alpha01"}
    )
    assert response.json()["app"] == "union-eyes-sandbox"


def test_bypass_role_with_method(clean):
    """A member's HEAD request on an analytics route still meets the role gate."""
    response = clean.client.head(
        CROSS_ORG, headers={"Authorization": f"Bearer {clean.token(role='member')}"}
    )
    assert response.status_code == 403


def test_bypass_role_with_spelling(clean):
    """A member's request on another spelling still meets the role gate."""
    token = clean.token(role="member")
    response = clean.raw(
        "GET",
        "/API/analytics//cross-org/",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 403


# Telemetry emitted by the app.


@pytest.fixture(scope="module")
def observed(start, database) -> Sandbox:
    """An app that has served one request of each kind the telemetry tests read."""
    sandbox = start(database)
    member = sandbox.token("org_alpha01", "member")
    admin = sandbox.token("org_bravo02", "admin")
    sandbox.get(REWARDS, member, headers={"User-Agent": "test-browser/1"})
    sandbox.get(TAX, params={"orgId": "org_charlie03"})
    sandbox.get(CROSS_ORG, member)
    sandbox.get(CROSS_TENANT, admin)
    sandbox.get("/api/health")
    return sandbox


def test_auth_success_dimensions(observed):
    """auth_success carries exactly orgId, userId, route, role and userAgent."""
    events = observed.events("auth_success")
    assert {frozenset(event) for event in events} == {
        frozenset({"orgId", "userId", "route", "role", "userAgent"})
    }


def test_auth_success_user_agent(observed):
    """auth_success records the caller's User-Agent."""
    agents = {event["userAgent"] for event in observed.events("auth_success")}
    assert "test-browser/1" in agents


def test_auth_success_per_request(observed):
    """Every authenticated export or analytics request records auth_success."""
    routes = sorted(event["route"] for event in observed.events("auth_success"))
    assert routes == sorted([REWARDS, CROSS_ORG, CROSS_TENANT])


def test_auth_failure_event(observed):
    """An anonymous export records auth_failure with the requested org."""
    events = observed.events("auth_failure")
    assert events == [
        {
            "orgId": "org_charlie03",
            "route": TAX,
            "reason": "missing_session",
            "userAgent": events[0]["userAgent"],
        }
    ]


def test_role_check_failed_event(observed):
    """A member on an analytics route records role_check_failed."""
    events = observed.events("role_check_failed")
    assert len(events) == 1
    assert {k: v for k, v in events[0].items() if k not in ("userId", "userAgent")} == {
        "orgId": "org_alpha01",
        "route": CROSS_ORG,
        "requiredRole": "admin",
        "actualRole": "member",
    }


def test_rls_context_set_events(observed):
    """Each tenant context set records rls_context_set with matching orgs."""
    pairs = sorted(
        (event["orgId"], event["requestOrgId"], event["route"])
        for event in observed.events("rls_context_set")
    )
    assert pairs == [
        ("org_alpha01", "org_alpha01", REWARDS),
        ("org_bravo02", "org_bravo02", CROSS_TENANT),
    ]


def test_rls_context_set_dimensions(observed):
    """rls_context_set carries exactly orgId, requestOrgId, userId and route."""
    keys = {frozenset(event) for event in observed.events("rls_context_set")}
    assert keys == {frozenset({"orgId", "requestOrgId", "userId", "route"})}


def test_query_total_metric(observed):
    """Each tenant context set records ue_query_total 1 for the org and route."""
    metrics = sorted(
        (value, dims["orgId"], dims["route"])
        for value, dims in observed.metrics("ue_query_total")
    )
    assert metrics == [
        (1.0, "org_alpha01", REWARDS),
        (1.0, "org_bravo02", CROSS_TENANT),
    ]


def test_latency_metric_every_request(observed):
    """Every request records ue_django_proxy_latency_ms with its route."""
    routes = sorted(
        dims["route"] for _, dims in observed.metrics("ue_django_proxy_latency_ms")
    )
    assert routes == sorted([REWARDS, TAX, CROSS_ORG, CROSS_TENANT, "/api/health"])


def test_registry_rejects_unknown_role():
    """SessionRegistry.issue raises ValueError for a role outside the hierarchy."""
    with pytest.raises(ValueError):
        SessionRegistry().issue("org_alpha01", "superadmin")


def test_registry_revoke(clean):
    """A revoked session token is rejected with 401."""
    token = clean.token()
    clean.sessions.revoke(token)
    assert clean.get(REWARDS, token).status_code == 401
