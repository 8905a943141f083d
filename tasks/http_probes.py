"""HTTP probes of the UE application: health routes and the auth gates.

One task covers every org, with requests sent concurrently, so the number of
Prefect task runs does not grow with the number of orgs.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ue_pilot.checks import CheckResult, failed, inconclusive, passed
from ue_pilot.clients import build_http_client
from ue_pilot.settings import Settings

# Bytes of a response body read to classify it; an export can be large.
BODY_SAMPLE_BYTES = 256 * 1024
HEALTH_BODY_BYTES = 64 * 1024
LOGIN_MARKERS = ("sign-in", "signin", "login", "log-in", "auth")

# Headers that have let requests slip past auth middleware in real frameworks,
# for example Next.js' internal subrequest header (CVE-2025-29927).
BYPASS_HEADERS = {
    "x-middleware-subrequest": "middleware:middleware:middleware:middleware:middleware",
    "x-original-url": "/api/health",
    "x-rewrite-url": "/api/health",
    "x-forwarded-for": "127.0.0.1",
    "x-real-ip": "127.0.0.1",
}


@dataclass
class Probe:
    """The outcome of one request, reduced to what the checks need. Never a row."""

    method: str
    path: str
    status: int | None
    outcome: str  # allowed, rejected, unauthenticated, redirected, error
    location: str = ""
    error: str = ""
    row_orgs: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict[str, object]:
        data: dict[str, object] = {
            "request": f"{self.method} {self.path}",
            "status": self.status,
            "outcome": self.outcome,
        }
        if self.location:
            data["location"] = self.location
        if self.error:
            data["error"] = self.error
        if self.row_orgs:
            data["rows_by_org"] = self.row_orgs
        return data


def is_login_redirect(location: str) -> bool:
    path = urlsplit(location).path.lower()
    return any(marker in path for marker in LOGIN_MARKERS)


def classify(status: int, location: str, has_body: bool, method: str,
             with_session: bool = False) -> str:
    """Map a response to allowed, rejected, unauthenticated or redirected.

    A redirect to a login page rejects an anonymous request; for a request
    carrying a session it means the server did not accept the session.
    """
    if status == 401:
        return "unauthenticated"
    if status in (403, 404, 405):
        return "rejected"
    if 300 <= status < 400:
        if not is_login_redirect(location):
            return "redirected"
        return "unauthenticated" if with_session else "rejected"
    if 200 <= status < 300:
        # A CORS preflight response carries no data. Anything else served is access.
        if method == "OPTIONS" and not has_body:
            return "rejected"
        return "allowed"
    return "error"


def count_row_orgs(body: bytes, content_type: str, org_field: str) -> dict[str, int]:
    """Count the rows per org in a sample of an export body (CSV or paged JSON).

    A body that cannot be parsed yields no counts rather than an error, so one
    odd response cannot take the other probes' evidence down with it.
    """
    try:
        return parse_row_orgs(body, content_type, org_field)
    except (csv.Error, RecursionError, ValueError, TypeError, AttributeError):
        return {}


def parse_row_orgs(body: bytes, content_type: str, org_field: str) -> dict[str, int]:
    if "json" in content_type:
        data = json.loads(body)
        rows = data.get("results", data) if isinstance(data, dict) else data
        counts: dict[str, int] = {}
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict):
                org = str(row.get(org_field, ""))
                counts[org] = counts.get(org, 0) + 1
        return counts

    text = body.decode("utf-8-sig", errors="replace")
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines = lines[:-1]  # a sample or a cut body may end inside a record
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    counts = {}
    if not reader.fieldnames or org_field not in reader.fieldnames:
        return counts
    for row in reader:
        org = row.get(org_field) or ""
        counts[org] = counts.get(org, 0) + 1
    return counts


async def send_probe(
    client: httpx.AsyncClient,
    settings: Settings,
    method: str,
    path: str,
    token: str | None = None,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Probe:
    """Send one request and classify its response without keeping any row.

    The request must finish within twice the HTTP timeout in all, so a server
    that drips bytes cannot hold the audit.
    """
    try:
        try:
            return await asyncio.wait_for(
                exchange(client, settings, method, path, token, params, headers),
                timeout=2 * settings.http_timeout_seconds,
            )
        except httpx.RemoteProtocolError:
            # A server may close a kept-alive connection just as it is reused;
            # no response was sent, so sending it once more is safe.
            return await asyncio.wait_for(
                exchange(client, settings, method, path, token, params, headers),
                timeout=2 * settings.http_timeout_seconds,
            )
    except TimeoutError:
        return Probe(method, path, None, "error", error="request timed out")
    except httpx.HTTPError as error:
        return Probe(
            method, path, None, "error", error=f"{type(error).__name__}: {error}"
        )


def probe_url(client: httpx.AsyncClient, path: str,
              params: dict[str, str] | None) -> httpx.URL:
    """Build the URL with `path` sent as written.

    httpx would otherwise merge "//" and resolve "/./", and those spellings
    are what some auth middleware matches differently.
    """
    raw = path + ("?" + urlencode(params) if params else "")
    return client.base_url.copy_with(raw_path=raw.encode())


async def exchange(client, settings, method, path, token, params, headers) -> Probe:
    request_headers = dict(headers or {})
    if token:
        request_headers["Authorization"] = f"Bearer {token}"
    request = client.build_request(method, probe_url(client, path, params),
                                   headers=request_headers)
    response = await client.send(request, stream=True)
    try:
        body = b""
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) >= BODY_SAMPLE_BYTES:
                break
        # Only the path of a redirect is kept: its query may carry a token.
        location = urlsplit(response.headers.get("location", "")).path
        outcome = classify(response.status_code, location, bool(body), method,
                           with_session=bool(token))
        row_orgs = {}
        if outcome == "allowed" and body:
            row_orgs = count_row_orgs(
                body,
                response.headers.get("content-type", ""),
                settings.export_org_field,
            )
        return Probe(
            method, path, response.status_code, outcome, location, row_orgs=row_orgs
        )
    finally:
        await response.aclose()


@task(
    name="probe-health", retries=2, retry_delay_seconds=[5, 15], cache_policy=NO_CACHE
)
async def probe_health(
    settings: Settings, user_agent: str | None = None
) -> list[CheckResult]:
    """Probe the readiness and health routes (runbook step 1)."""
    logger = get_run_logger()
    async with build_http_client(settings, user_agent) as client:
        ready, health = await asyncio.gather(
            send_probe(client, settings, "GET", settings.ready_path),
            client_json(client, settings.health_path,
                        2 * settings.http_timeout_seconds),
        )
    logger.info("health.ready: %s %s", ready.status, ready.outcome)
    return [evaluate_ready(ready), evaluate_health(*health)]


async def client_json(client: httpx.AsyncClient, path: str,
                      timeout: float) -> tuple[int | None, object, str]:
    """GET a JSON route, reading at most HEALTH_BODY_BYTES of its body."""
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("GET", path) as response:
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > HEALTH_BODY_BYTES:
                        return response.status_code, None, "body too large"
    except TimeoutError:
        return None, None, "request timed out"
    except httpx.HTTPError as error:
        return None, None, f"{type(error).__name__}: {error}"
    try:
        return response.status_code, json.loads(body), ""
    except ValueError:
        return response.status_code, None, "body is not JSON"


def evaluate_ready(probe: Probe) -> CheckResult:
    observed = probe.describe()
    if probe.outcome == "error" and probe.status is None:
        return failed("health.ready", "readiness route unreachable", **observed)
    if probe.outcome in ("unauthenticated", "rejected") or (
        probe.outcome == "redirected" and is_login_redirect(probe.location)
    ):
        return inconclusive(
            "health.ready",
            "probe rejected: the readiness route sits behind auth, so readiness "
            "is unknown",
            **observed,
        )
    if probe.status is not None and 200 <= probe.status < 300:
        return passed("health.ready", "ready", **observed)
    if probe.status is not None and probe.status >= 500:
        return failed("health.ready", "not ready", **observed)
    return inconclusive("health.ready", "unexpected readiness answer", **observed)


def evaluate_health(status: int | None, body: object, error: str) -> CheckResult:
    observed: dict[str, object] = {"status": status}
    if isinstance(body, dict):
        observed["reported"] = body.get("status")
        observed["checks"] = body.get("checks")
    if error:
        observed["error"] = error
    if status is None:
        return failed("health.health", "health route unreachable", **observed)
    if status == 401:
        return inconclusive(
            "health.health", "probe rejected by the health route", **observed
        )
    if status == 200 and isinstance(body, dict) and body.get("status") == "ok":
        return passed("health.health", "healthy", **observed)
    if status >= 500 or (isinstance(body, dict) and body.get("status") == "degraded"):
        return failed("health.health", "degraded", **observed)
    return inconclusive("health.health", "health answer not understood", **observed)
