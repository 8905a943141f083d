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
from urllib.parse import urlsplit

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ue_pilot.checks import CheckResult, failed, inconclusive, passed
from ue_pilot.clients import build_http_client
from ue_pilot.settings import Settings

# Bytes of a response body read to classify it; an export can be large.
BODY_SAMPLE_BYTES = 256 * 1024
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


def classify(status: int, location: str, has_body: bool, method: str) -> str:
    """Map a response to allowed, rejected, unauthenticated or redirected."""
    if status == 401:
        return "unauthenticated"
    if status in (403, 404, 405):
        return "rejected"
    if 300 <= status < 400:
        return "rejected" if is_login_redirect(location) else "redirected"
    if 200 <= status < 300:
        # A CORS preflight response carries no data. Anything else served is access.
        if method == "OPTIONS" and not has_body:
            return "rejected"
        return "allowed"
    return "error"


def count_row_orgs(body: bytes, content_type: str, org_field: str) -> dict[str, int]:
    """Count the rows per org in a sample of an export body (CSV or paged JSON)."""
    if "json" in content_type:
        try:
            data = json.loads(body)
        except ValueError:
            return {}
        rows = data.get("results", data) if isinstance(data, dict) else data
        counts: dict[str, int] = {}
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict):
                org = str(row.get(org_field, ""))
                counts[org] = counts.get(org, 0) + 1
        return counts

    text = body.decode("utf-8-sig", errors="replace")
    lines = text.splitlines()
    if len(body) >= BODY_SAMPLE_BYTES and lines:
        lines = lines[:-1]  # the sample may end inside the last record
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
    """Send one request and classify its response without keeping any row."""
    request_headers = dict(headers or {})
    if token:
        request_headers["Authorization"] = f"Bearer {token}"
    try:
        async with client.stream(
            method, path, params=params, headers=request_headers
        ) as response:
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) >= BODY_SAMPLE_BYTES:
                    break
            location = response.headers.get("location", "")
            outcome = classify(response.status_code, location, bool(body), method)
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
    except httpx.HTTPError as error:
        return Probe(
            method, path, None, "error", error=f"{type(error).__name__}: {error}"
        )


@task(
    name="probe-health", retries=2, retry_delay_seconds=[5, 15], cache_policy=NO_CACHE
)
async def probe_health(settings: Settings) -> list[CheckResult]:
    """Probe the readiness and health routes (runbook step 1)."""
    logger = get_run_logger()
    async with build_http_client(settings) as client:
        ready, health = await asyncio.gather(
            send_probe(client, settings, "GET", settings.ready_path),
            client_json(client, settings.health_path),
        )
    logger.info("health.ready: %s %s", ready.status, ready.outcome)
    return [evaluate_ready(ready), evaluate_health(*health)]


async def client_json(client: httpx.AsyncClient, path: str):
    try:
        response = await client.get(path)
    except httpx.HTTPError as error:
        return None, None, f"{type(error).__name__}: {error}"
    try:
        return response.status_code, response.json(), ""
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
