"""Probes of the auth gates of the export and cross-org routes, for every org.

Runbook: "Confirm export routes require auth" and "Verify cross-org routes".
A rejection proves a gate is closed only when the server accepted the probe
session used for it. A 401 to a request carrying a session means the server
rejected the session itself, and with a dead session every gate looks closed.
"""

from __future__ import annotations

import asyncio

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.http_probes import BYPASS_HEADERS, Probe, send_probe
from ue_pilot.checks import CheckResult, failed, inconclusive, passed
from ue_pilot.clients import build_http_client
from ue_pilot.settings import Settings

CLOSED = ("rejected", "unauthenticated")


# Connections per client. httpcore 1.x checks every connection of its pool
# for expiry on each request it assigns, so one pool of 32 connections costs
# far more CPU per request than eight pools of 4.
CONNECTIONS_PER_CLIENT = 4


class Prober:
    """Sends probes over several small client pools under one concurrency limit."""

    def __init__(self, clients: list[httpx.AsyncClient], settings: Settings) -> None:
        self.clients = clients
        self.settings = settings
        self.idle = asyncio.Queue()
        for client in clients:
            for _ in range(CONNECTIONS_PER_CLIENT):
                self.idle.put_nowait(client)
        self.requests = 0

    async def send(
        self,
        method: str,
        path: str,
        token: str | None = None,
        org: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Probe:
        params = {"orgId": org} if org else None
        if org and path in self.settings.export_paths:
            params["format"] = self.settings.export_format
        # Each slot in the queue is one connection of one client.
        client = await self.idle.get()
        try:
            self.requests += 1
            return await send_probe(
                client,
                self.settings,
                method,
                path,
                token=token,
                params=params,
                headers=headers,
            )
        finally:
            self.idle.put_nowait(client)


def path_variants(path: str) -> list[str]:
    """Spellings of `path` that naive middleware matchers treat as another route."""
    head, _, last = path.rpartition("/")
    return [
        path + "/",
        path.upper(),
        "/" + path,
        f"{head}/{last[:-1]}%{ord(last[-1]):02X}",
        path + ";.css",
        f"{head}/%2e/{last}",
    ]
    # NOTE: "/./" is not probed: httpx resolves dot segments before sending,
    # so that spelling never reaches the server.


def summarize_gate(
    check_id: str, probes: list[Probe], org: str | None, expected: str
) -> CheckResult:
    """Pass when every probe was closed, fail when any was served."""
    observed = {"expected": expected, "probes": [p.describe() for p in probes]}
    served = [p for p in probes if p.outcome == "allowed"]
    if served:
        return failed(
            check_id,
            f"{len(served)} request(s) served without the gate",
            org,
            **observed,
        )
    if not probes:
        return inconclusive(check_id, "no route to probe", org, **observed)
    # A redirect elsewhere than a login page may lead to the data itself.
    unclear = [p for p in probes if p.outcome not in CLOSED]
    if unclear:
        return inconclusive(
            check_id, "some probes failed or answered unexpectedly", org, **observed
        )
    return passed(check_id, expected, org, **observed)


async def probe_anonymous_gates(prober: Prober, org: str) -> list[CheckResult]:
    """Probe both gate families without a session, once for the deployment."""
    settings = prober.settings
    export_probes = [
        await prober.send("GET", path, org=org) for path in settings.export_paths
    ]
    cross_probes = [await prober.send("GET", path) for path in settings.cross_org_paths]

    variant_jobs = []
    for path in settings.export_paths + settings.cross_org_paths:
        target = org if path in settings.export_paths else None
        for method in ("HEAD", "POST", "OPTIONS"):
            variant_jobs.append(prober.send(method, path, org=target))
        for variant in path_variants(path):
            variant_jobs.append(prober.send("GET", variant, org=target))
        for name, value in BYPASS_HEADERS.items():
            variant_jobs.append(
                prober.send("GET", path, org=target, headers={name: value})
            )
    variant_probes = list(await asyncio.gather(*variant_jobs))

    return [
        summarize_gate(
            "access.export_requires_auth",
            export_probes,
            None,
            "export routes reject requests without a session",
        ),
        summarize_gate(
            "access.cross_org_requires_auth",
            cross_probes,
            None,
            "cross-org routes reject requests without a session",
        ),
        summarize_gate(
            "access.auth_bypass",
            variant_probes,
            None,
            "no method, path spelling or header slips past auth",
        ),
    ]


async def probe_org_gates(
    prober: Prober, org: str, sessions: dict[str, dict[str, str]], other_org: str | None
) -> list[CheckResult]:
    """Probe the session-bearing gates of one org."""
    settings = prober.settings
    own = sessions.get(org, {})
    min_role = settings.cross_org_min_role
    below = settings.roles_below(min_role)
    own_role = next((role for role in settings.role_hierarchy if role in own), None)
    other_token = None
    if other_org:
        other_sessions = sessions.get(other_org, {})
        other_token = next(iter(other_sessions.values()), None)

    missing = [role for role in below + [min_role] if role not in own]
    if other_org and not other_token:
        missing.append(f"any role of {other_org}")
    rejected_sessions: list[str] = []
    used_sessions: set[str] = set()
    accepted_sessions: set[str] = set()

    async def send_as(
        role_label: str, method: str, path: str, token: str | None, target: str | None
    ) -> Probe:
        probe = await prober.send(method, path, token=token, org=target)
        used_sessions.add(role_label)
        if probe.outcome == "unauthenticated":
            rejected_sessions.append(role_label)
        # Served, or refused with 403, the server knew who was asking.
        if probe.outcome == "allowed" or probe.status == 403:
            accepted_sessions.add(role_label)
        return probe

    results: list[CheckResult] = []

    # Another org's session must not read this org's export.
    if other_token:
        probes = await asyncio.gather(
            *[
                send_as(f"{other_org} session", "GET", path, other_token, org)
                for path in settings.export_paths
            ]
        )
        results.append(evaluate_other_org(org, list(probes)))
    else:
        results.append(
            inconclusive(
                "access.export_rejects_other_org",
                "no probe session of another org is configured",
                org,
            )
        )

    # The org's own session must read its own export, and only its own rows.
    if own_role:
        probes = await asyncio.gather(
            *[
                send_as(f"{org} {own_role}", "GET", path, own[own_role], org)
                for path in settings.export_paths
            ]
        )
        results.extend(evaluate_own_export(org, own_role, list(probes)))
    else:
        results.append(
            inconclusive(
                "access.export_allows_own_org", "no probe session for this org", org
            )
        )

    # Each role below the minimum is refused the cross-org routes.
    role_probes = await asyncio.gather(
        *[
            send_as(f"{org} {role}", "GET", path, own[role], None)
            for role in below
            if role in own
            for path in settings.cross_org_paths
        ]
    )
    results.append(evaluate_role_gate(org, below, list(role_probes), missing))

    # The minimum role is admitted.
    if min_role in own:
        probes = await asyncio.gather(
            *[
                send_as(f"{org} {min_role}", "GET", path, own[min_role], None)
                for path in settings.cross_org_paths
            ]
        )
        results.append(evaluate_min_role(org, min_role, list(probes)))
    else:
        results.append(
            inconclusive(
                "access.cross_org_allows_min_role",
                f"no probe session with role {min_role}",
                org,
            )
        )

    unproven = sorted(used_sessions - accepted_sessions - set(rejected_sessions))
    results.append(evaluate_sessions(org, missing, rejected_sessions, unproven))
    return results


def evaluate_other_org(org: str, probes: list[Probe]) -> CheckResult:
    check_id = "access.export_rejects_other_org"
    observed = {"probes": [p.describe() for p in probes]}
    if not probes:
        return inconclusive(check_id, "no export route to probe", org)
    leaked = [p for p in probes if p.outcome == "allowed" and p.row_orgs.get(org)]
    if leaked:
        return failed(
            check_id, "another org's session received this org's rows", org, **observed
        )
    if any(p.outcome == "unauthenticated" for p in probes):
        return inconclusive(
            check_id,
            "the other org's probe session was rejected (401), so the gate is unproven",
            org,
            **observed,
        )
    if all(p.outcome in ("rejected", "allowed") for p in probes):
        return passed(
            check_id,
            "another org's session is refused this org's rows",
            org,
            **observed,
        )
    return inconclusive(check_id, "some probes failed", org, **observed)


def evaluate_own_export(org: str, role: str, probes: list[Probe]) -> list[CheckResult]:
    observed = {"role": role, "probes": [p.describe() for p in probes]}
    allowed = [p for p in probes if p.outcome == "allowed"]
    if not probes:
        return [inconclusive("access.export_allows_own_org",
                             "no export route to probe", org)]
    if any(p.outcome == "unauthenticated" for p in probes):
        access = inconclusive(
            "access.export_allows_own_org",
            "the org's probe session was rejected (401)",
            org,
            **observed,
        )
    elif len(allowed) == len(probes):
        access = passed(
            "access.export_allows_own_org", "own export served", org, **observed
        )
    elif any(p.outcome == "rejected" or (p.status or 0) >= 500 for p in probes):
        access = failed(
            "access.export_allows_own_org",
            "the org's own session is refused its export",
            org,
            **observed,
        )
    else:
        access = inconclusive(
            "access.export_allows_own_org", "some probes failed", org, **observed
        )

    foreign = {
        other: count
        for probe in allowed
        for other, count in probe.row_orgs.items()
        if other != org
    }
    rows = sum(sum(p.row_orgs.values()) for p in allowed)
    if foreign:
        ownership = failed(
            "access.export_rows_belong_to_org",
            "the org's export carries other orgs' rows",
            org,
            foreign_rows=foreign,
            rows_sampled=rows,
        )
    elif rows:
        ownership = passed(
            "access.export_rows_belong_to_org",
            "every sampled row belongs to the org",
            org,
            rows_sampled=rows,
        )
    else:
        ownership = inconclusive(
            "access.export_rows_belong_to_org", "no rows to check", org, rows_sampled=0
        )
    return [access, ownership]


def evaluate_role_gate(
    org: str, below: list[str], probes: list[Probe], missing: list[str]
) -> CheckResult:
    check_id = "access.cross_org_requires_role"
    observed = {"roles_below_minimum": below, "probes": [p.describe() for p in probes]}
    if not below:
        return inconclusive(check_id, "no role ranks below the minimum in "
                            "UE_ROLE_HIERARCHY, so the gate is unproven", org)
    if any(p.outcome == "allowed" for p in probes):
        return failed(
            check_id,
            "a role below the minimum reached a cross-org route",
            org,
            **observed,
        )
    if any(role in missing for role in below):
        return inconclusive(
            check_id,
            "a probe session for a role below the minimum is missing",
            org,
            missing=missing,
            **observed,
        )
    if any(p.outcome == "unauthenticated" for p in probes):
        return inconclusive(
            check_id,
            "a probe session was rejected (401), so the role gate is unproven",
            org,
            **observed,
        )
    if all(p.outcome == "rejected" for p in probes):
        return passed(check_id, "roles below the minimum are refused", org, **observed)
    return inconclusive(check_id, "some probes failed", org, **observed)


def evaluate_min_role(org: str, role: str, probes: list[Probe]) -> CheckResult:
    check_id = "access.cross_org_allows_min_role"
    observed = {"role": role, "probes": [p.describe() for p in probes]}
    if not probes:
        return inconclusive(check_id, "no cross-org route to probe", org)
    if all(p.outcome == "allowed" for p in probes):
        return passed(check_id, f"role {role} is admitted", org, **observed)
    if any(p.outcome == "unauthenticated" for p in probes):
        return inconclusive(
            check_id, "the probe session was rejected (401)", org, **observed
        )
    if any(p.outcome == "rejected" for p in probes):
        return failed(
            check_id, f"role {role} is refused the cross-org routes", org, **observed
        )
    return inconclusive(check_id, "some probes failed", org, **observed)


def evaluate_sessions(org: str, missing: list[str], rejected: list[str],
                      unproven: list[str]) -> CheckResult:
    check_id = "access.probe_sessions"
    if unproven and not (missing or rejected):
        return inconclusive(
            check_id,
            "no response proved these probe sessions valid (no 2xx or 403)",
            org,
            unproven=unproven,
        )
    if missing or rejected:
        return inconclusive(
            check_id,
            "probe sessions missing or not accepted by the server; gates that "
            "look closed to them prove nothing",
            org,
            missing=missing,
            rejected=sorted(set(rejected)),
        )
    return passed(check_id, "every probe session was accepted", org)


def other_org_for(
    org: str,
    orgs: list[str],
    index: int,
    sessions: dict[str, dict[str, str]],
    pilot_org_ids: list[str],
) -> str | None:
    """Return the org whose session tries to read `org`'s export.

    That is the next audited org. When only one org is audited, it is another
    pilot org with a probe session, else any other org with one.
    """
    if len(orgs) > 1:
        return orgs[(index + 1) % len(orgs)]
    candidates = [o for o in pilot_org_ids if o != org and sessions.get(o)]
    candidates += sorted(o for o in sessions if o != org and sessions.get(o))
    return candidates[0] if candidates else None


@task(name="probe-access", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
async def probe_access(
    settings: Settings, orgs: list[str], user_agent: str | None = None
) -> list[CheckResult]:
    """Probe the export and cross-org gates for every org in one task."""
    logger = get_run_logger()
    sessions = settings.probe_session_map()
    count = max(1, -(-settings.http_concurrency // CONNECTIONS_PER_CLIENT))
    clients = [
        build_http_client(settings, user_agent, max_connections=CONNECTIONS_PER_CLIENT)
        for _ in range(count)
    ]
    try:
        prober = Prober(clients, settings)
        jobs = [probe_anonymous_gates(prober, orgs[0])]
        for index, org in enumerate(orgs):
            other = other_org_for(org, orgs, index, sessions, settings.pilot_org_ids)
            jobs.append(probe_org_gates(prober, org, sessions, other))
        groups = await asyncio.gather(*jobs)
    finally:
        for client in clients:
            await client.aclose()
    logger.info("access: %d requests for %d orgs", prober.requests, len(orgs))
    return [check for group in groups for check in group]
