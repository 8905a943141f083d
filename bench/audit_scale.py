"""Benchmark the isolation audit at 10, 100 and 1,000 sandbox orgs.

Each size runs twice: with no added latency and with a per-request delay in
the UE application and the Logs stand-in. The delay simulates a cloud round
trip, because on loopback both sides are CPU-bound, which hides what
concurrency buys.

Two sides are measured against the same sandbox:

- audit: the real `isolation_audit` flow, reporting to a warm Prefect server
  that this script starts on 127.0.0.1 with its own temporary PREFECT_HOME.
- baseline: what the runbook does by hand, with no Prefect run. For each org
  in turn it runs every KQL query of the audit once, sends that org's access
  probes one at a time, and probes the org's RLS context on its own
  connection.

Every measurement runs in a child process (`--measure`), so its peak RSS is
its own. The parent prints a table and rewrites the generated section of
docs/benchmarks.md.

Run: .venv/bin/python bench/audit_scale.py [--baseline-max-orgs 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Self
from urllib.parse import urlsplit

import httpx

if TYPE_CHECKING:
    from ue_pilot.settings import Settings

# Prefect reads its settings when it is first imported, in the functions below.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

SIZES = (10, 100, 1000)
DELAYS_MS = (0, 20)
DOC_PATH = REPO / "docs" / "benchmarks.md"
DOC_BEGIN = "<!-- audit-scale:begin -->"
DOC_END = "<!-- audit-scale:end -->"
ACCESS_LOG = re.compile(r"access: (\d+) requests")

# Targets of the audit at the largest size.
TARGET_WALL_SECONDS = 30.0
TARGET_SPEEDUP = 10.0
TARGET_RSS_MB = 400.0


# Child side: one measurement, printed as one JSON line.


def peak_rss_mb() -> float:
    """Return this process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_query_count(logs_endpoint: str) -> int:
    """Return the number of queries the Logs stand-in has served so far."""
    response = httpx.get(f"{logs_endpoint}/sandbox/stats", timeout=30,
                         trust_env=False)
    response.raise_for_status()
    return response.json()["queries"]


def cpu_seconds(pid: int) -> float:
    """Return the user and system CPU seconds process `pid` has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The fields after the command name start at field 3 of proc(5), so
    # utime (14) and stime (15) are at indexes 11 and 12, in clock ticks.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Stopwatch:
    """Wall time, CPU time and Logs queries spent inside a `with` block.

    `watched` maps a label to the process ids whose CPU time is summed under
    it, besides this process's own (`bench`).
    """

    def __init__(self, logs_endpoint: str, watched: dict[str, list[int]]) -> None:
        self.logs_endpoint = logs_endpoint
        self.watched = watched

    def _cpu(self) -> dict[str, float]:
        cpu = {"bench": own_cpu_seconds()}
        for label, pids in self.watched.items():
            cpu[label] = sum(cpu_seconds(pid) for pid in pids)
        return cpu

    def __enter__(self) -> Self:
        self._queries = read_query_count(self.logs_endpoint)
        self._cpu_before = self._cpu()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wall_s = time.perf_counter() - self._started
        cpu = self._cpu()
        self.cpu_s = {label: cpu[label] - self._cpu_before[label] for label in cpu}
        self.kql_queries = read_query_count(self.logs_endpoint) - self._queries

    def figures(self) -> dict:
        return {"wall_s": self.wall_s, "cpu_s": self.cpu_s,
                "kql_queries": self.kql_queries}


def measure_audit(watched: dict[str, list[int]]) -> dict:
    """Run the isolation audit flow once and read its run history."""
    from flows.isolation_audit import isolation_audit
    from ue_pilot.settings import Settings

    settings = Settings()
    with Stopwatch(settings.logs_endpoint, watched) as stopwatch:
        state = isolation_audit(return_state=True)

    result = state.result()
    task_runs, requests, warnings = read_run_history(state.state_details.flow_run_id)
    return {
        **stopwatch.figures(),
        "task_runs": len(task_runs),
        "task_seconds": task_durations(task_runs),
        "http_requests": requests,
        "peak_rss_mb": peak_rss_mb(),
        "verdict": result["verdict"],
        "not_passing": count_not_passing(result["checks"]),
        "not_passing_examples": describe_not_passing(result["checks"]),
        "warnings": warnings,
        "orgs": result["target"]["orgs"],
    }


def count_not_passing(checks: list[dict]) -> dict[str, int]:
    """Count the checks that did not pass by check id and status."""
    counts: dict[str, int] = {}
    for check in checks:
        if check["status"] != "pass":
            key = f"{check['id']} {check['status']}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def describe_not_passing(checks: list[dict], limit: int = 3) -> list[str]:
    """Return the org, summary and observed values of the first checks not passing.

    Observed values contain probe outcomes and counts, never a token or a row.
    """
    described = []
    for check in checks:
        if check["status"] != "pass" and len(described) < limit:
            observed = json.dumps(check["observed"], default=str)[:1500]
            described.append(f"{check['id']} ({check['org'] or 'deployment'}): "
                             f"{check['summary']}; observed {observed}")
    return described


def read_run_history(
    flow_run_id, timeout: float = 30.0
) -> tuple[list, int | None, list[str]]:
    """Return the flow run's task runs, the requests `probe-access` logged, and
    the run's warning and error log messages.

    Prefect 3 sends task run states and logs in the background, so the reads
    repeat until every task run is final and the access log line has arrived,
    or until `timeout` seconds have passed.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout)
    EventsWorker.drain_all(timeout=timeout)
    runs_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    logs_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            task_runs = client.read_task_runs(flow_run_filter=runs_filter)
            logs = client.read_logs(log_filter=logs_filter)
            matches = [ACCESS_LOG.search(log.message) for log in logs]
            requests = next((int(m.group(1)) for m in matches if m), None)
            final = bool(task_runs) and all(
                run.state and run.state.is_final() for run in task_runs
            )
            if (final and requests is not None) or time.monotonic() > deadline:
                warnings = [log.message[:300] for log in logs
                            if log.level >= logging.WARNING]
                return task_runs, requests, warnings
            time.sleep(0.5)


def task_durations(task_runs) -> dict[str, float]:
    """Map each task's name to its run time in seconds, from the run history."""
    durations = {}
    for run in task_runs:
        if run.start_time and run.end_time:
            name = run.name.rsplit("-", 1)[0]
            durations[name] = (run.end_time - run.start_time).total_seconds()
    return durations


@dataclass
class SequentialProber:
    """Sends the audit's access probes one at a time through a sync client.

    It has the interface of `tasks.http_access.Prober`, so the audit's own
    probe functions choose the requests and evaluate the responses. `send`
    blocks the event loop on purpose: each request finishes before the next
    coroutine starts, so nothing runs concurrently.
    """

    client: httpx.Client
    settings: Settings
    requests: int = 0

    async def send(self, method: str, path: str, token: str | None = None,
                   org: str | None = None, headers: dict[str, str] | None = None):
        # The same query parameters as Prober.send.
        params = {"orgId": org} if org else None
        if org and path in self.settings.export_paths:
            params["format"] = self.settings.export_format
        self.requests += 1
        return send_probe_sync(self.client, self.settings, method, path, token,
                               params, headers)


def send_probe_sync(client: httpx.Client, settings: Settings, method: str,
                    path: str, token: str | None, params: dict | None,
                    headers: dict | None):
    """Send one request and classify it as `tasks.http_probes.send_probe` does."""
    from tasks.http_probes import (
        BODY_SAMPLE_BYTES,
        Probe,
        classify,
        count_row_orgs,
        probe_url,
    )

    # NOTE: This mirrors `tasks.http_probes.exchange` with a sync client, so a
    # change there needs the same change here.
    request_headers = dict(headers or {})
    if token:
        request_headers["Authorization"] = f"Bearer {token}"
    try:
        request = client.build_request(method, probe_url(client, path, params),
                                       headers=request_headers)
        response = client.send(request, stream=True)
    except httpx.HTTPError as error:
        return Probe(method, path, None, "error",
                     error=f"{type(error).__name__}: {error}")
    try:
        body = b""
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) >= BODY_SAMPLE_BYTES:
                break
        location = urlsplit(response.headers.get("location", "")).path
        outcome = classify(response.status_code, location, bool(body), method,
                           with_session=bool(token))
        row_orgs = {}
        if outcome == "allowed" and body:
            content_type = response.headers.get("content-type", "")
            row_orgs = count_row_orgs(body, content_type, settings.export_org_field)
        return Probe(method, path, response.status_code, outcome, location,
                     row_orgs=row_orgs)
    except httpx.HTTPError as error:
        return Probe(method, path, None, "error",
                     error=f"{type(error).__name__}: {error}")
    finally:
        response.close()


def query_telemetry_for_org(logs_client, settings: Settings,
                            queries: dict[str, str], org: str, window) -> list:
    """Run every KQL query of the audit once, one after another, for one org."""
    from tasks.logs import evaluate_telemetry, run_query

    outcomes = {key: run_query(logs_client, settings, text, window)
                for key, text in queries.items()}
    return evaluate_telemetry(settings, [org], outcomes, window[1])


async def probe_access_for_org(prober: SequentialProber, sessions: dict,
                               orgs: list[str], index: int) -> list:
    """Send the access probes the audit sends for `orgs[index]`.

    The audit probes the anonymous gates once, with the first org, so this
    does too.
    """
    from tasks.http_access import probe_anonymous_gates, probe_org_gates

    org = orgs[index]
    other = orgs[(index + 1) % len(orgs)] if len(orgs) > 1 else None
    checks = []
    if index == 0:
        checks += await probe_anonymous_gates(prober, org)
    checks += await probe_org_gates(prober, org, sessions, other)
    return checks


def read_org_context(settings: Settings, query, tables, org: str) -> dict:
    """Set one org's context on a new connection and read what it exposes."""
    from tasks.database import read_context, set_context, switch_to_app_role
    from ue_pilot.clients import connect_database

    with connect_database(settings) as conn:
        switch_to_app_role(conn, settings)
        set_context(conn, settings, org)
        seen = read_context(conn, settings, query, tables, org)
        conn.rollback()
    return seen


def read_tenant_tables(settings: Settings) -> list[tuple[str, str]]:
    from tasks.database import TENANT_TABLES_SQL
    from ue_pilot.clients import connect_database

    with connect_database(settings) as conn:
        rows = conn.execute(TENANT_TABLES_SQL, {
            "column": settings.db_org_column, "schemas": settings.db_schemas,
        }).fetchall()
    return [(row[1], row[2]) for row in rows]


def run_baseline(settings: Settings) -> tuple[list, int]:
    """Check each org in turn as the runbook does by hand.

    Returns the checks and the number of HTTP requests sent to the UE app.
    """
    from tasks.database import (
        count_query,
        evaluate_fail_open,
        evaluate_org_context,
        evaluate_reuse,
        read_after_reuse,
        read_all_contexts,
    )
    from tasks.logs import build_queries
    from tasks.state import register_probe_agent
    from ue_pilot.clients import build_logs_client

    orgs = list(settings.pilot_org_ids)
    now = datetime.now(UTC)
    lookback = settings.window_minutes + settings.window_overlap_minutes
    window = (now - timedelta(minutes=lookback), now)
    # The plain function under the task, so that the auth failure counts leave
    # this run's probes out, as they do the audit's.
    agent, agents = register_probe_agent.fn(settings)
    logs_client = build_logs_client(settings)
    queries = build_queries(settings, agents)
    sessions = settings.probe_session_map()
    tables = read_tenant_tables(settings)
    count_sql = count_query(settings, tables)

    checks = []
    per_org = {}
    with httpx.Client(base_url=settings.base_url,
                      timeout=settings.http_timeout_seconds,
                      follow_redirects=False,
                      headers={"User-Agent": agent},
                      trust_env=False) as http:
        prober = SequentialProber(http, settings)
        for index, org in enumerate(orgs):
            checks += query_telemetry_for_org(logs_client, settings, queries, org,
                                              window)
            checks += asyncio.run(probe_access_for_org(prober, sessions, orgs, index))
            per_org[org] = read_org_context(settings, count_sql, tables, org)
            checks += evaluate_org_context(settings, org, per_org[org])

    # Like the audit, read without a context and after pool reuse only once.
    _, without = read_all_contexts(settings, count_sql, tables, [])
    reuse = read_after_reuse(settings, count_sql, tables, orgs[0])
    checks.append(evaluate_fail_open(per_org, without))
    checks.append(evaluate_reuse(orgs[0], reuse))
    return checks, prober.requests


def measure_baseline(watched: dict[str, list[int]]) -> dict:
    """Run the by-hand baseline once and return its figures."""
    from ue_pilot.checks import verdict
    from ue_pilot.settings import Settings

    settings = Settings()
    with Stopwatch(settings.logs_endpoint, watched) as stopwatch:
        checks, requests = run_baseline(settings)
    check_dicts = [check.to_dict() for check in checks]
    return {
        **stopwatch.figures(),
        "task_runs": 0,
        "http_requests": requests,
        "peak_rss_mb": peak_rss_mb(),
        "verdict": verdict(checks).value,
        "not_passing": count_not_passing(check_dicts),
        "not_passing_examples": describe_not_passing(check_dicts),
        "orgs": len(settings.pilot_org_ids),
    }


# Parent side: the Prefect server, the sandboxes and the report.


class BenchError(RuntimeError):
    """A measurement, the Prefect server or a sandbox failed."""


class PrefectServer:
    """`prefect server start` on 127.0.0.1 with a temporary PREFECT_HOME (SQLite)."""

    def __init__(self, home: Path, startup_timeout: float = 180.0) -> None:
        from ue_pilot.sandbox.servers import find_free_port

        self.home = home
        self.port = find_free_port()
        self.url = f"http://{LOOPBACK}:{self.port}/api"
        self.log_path = home / "server.log"
        env = dict(os.environ, PREFECT_HOME=str(home),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_SERVER_UI_ENABLED="false")
        env.pop("PREFECT_API_URL", None)
        command = [str(Path(sys.executable).parent / "prefect"), "server", "start",
                   "--host", LOOPBACK, "--port", str(self.port), "--no-ui"]
        self._log = open(self.log_path, "wb")
        # Its own process group, because the CLI runs uvicorn as a child.
        self.process = subprocess.Popen(command, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        try:
            self._wait_until_healthy(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_until_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/health", timeout=5,
                             trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        log = self.log_path.read_text(errors="replace")[-3000:]
        raise BenchError(f"the Prefect server on port {self.port} did not respond "
                         f"to GET /api/health within {timeout:.0f} s; its log "
                         f"ends with:\n{log}")

    def pids(self) -> list[int]:
        """Return the process ids of the CLI process and its descendants."""
        found = [self.process.pid]
        for pid in found:
            for task in Path(f"/proc/{pid}/task").iterdir():
                children = (task / "children").read_text().split()
                found += [int(child) for child in children]
        return found

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server's process group with SIGTERM, SIGKILL if it hangs."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


def run_child(side: str, orgs: int, delay_ms: float, settings_file: Path,
              env: dict[str, str], watched: dict[str, list[int]],
              timeout: float) -> dict:
    """Run one measurement in a child process and return its JSON figures."""
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", side,
               "--orgs", str(orgs), "--delay-ms", str(delay_ms),
               "--settings-file", str(settings_file)]
    for label, pids in watched.items():
        command += ["--watch", f"{label}=" + ",".join(map(str, pids))]
    try:
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{side} at {orgs} orgs, {delay_ms:g} ms timed out "
                         f"after {timeout:.0f} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise BenchError(f"{side} at {orgs} orgs, {delay_ms:g} ms failed "
                         f"(exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def write_settings_file(sandbox_env: dict[str, str], path: Path) -> Path:
    """Write the sandbox's UE_ settings to a JSON file only this user can read.

    The children read their settings from this file and not from the
    environment, because UE_PROBE_SESSIONS of 1,000 orgs is longer than the
    128 KiB Linux allows for one environment string.
    """
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(sandbox_env, file)
    return path


def child_env(server: PrefectServer) -> dict[str, str]:
    """Return this process's environment without UE_ settings, using `server`."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("UE_")}
    env.update(PREFECT_API_URL=server.url, PREFECT_HOME=str(server.home),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


@dataclass
class Row:
    """The figures of one side at one size and delay."""

    side: str
    orgs: int
    delay_ms: float
    wall_s: float
    task_runs: int | None
    kql_queries: int | None
    http_requests: int | None
    peak_rss_mb: float | None
    verdict: str
    extrapolated: bool = False
    cpu_s: dict[str, float] | None = None
    task_seconds: dict[str, float] | None = None
    not_passing: dict[str, int] | None = None
    load_1min: float | None = None
    wall_range: tuple[float, float] | None = None


ROW_FIGURES = ("wall_s", "task_runs", "kql_queries", "http_requests",
               "peak_rss_mb", "verdict", "cpu_s", "task_seconds", "not_passing",
               "load_1min")


def measure_all(args: argparse.Namespace, server: PrefectServer,
                workdir: Path) -> list[Row]:
    """Start one sandbox per size and delay, and measure both sides against it."""
    # Imported here, so that the measuring children do not load the sandbox.
    from ue_pilot.sandbox.runner import SandboxProcess

    rows = []
    for delay in args.delays:
        for orgs in args.sizes:
            print(f"sandbox: {orgs} orgs, {delay:g} ms ...", flush=True)
            with SandboxProcess(orgs=orgs, request_delay_ms=delay) as sandbox:
                child = Child(
                    orgs=orgs, delay_ms=delay,
                    settings_file=write_settings_file(
                        sandbox.env, workdir / "ue-settings.json"),
                    env=child_env(server),
                    watched={"sandbox": [sandbox.process.pid],
                             "prefect-server": server.pids()},
                    timeout=args.timeout,
                )
                if not rows:
                    warm = child.run("audit")
                    print(f"  warm-up audit run: {warm['wall_s']:.1f} s", flush=True)
                rows.append(measure_side(child, "audit", args.audit_repeats))
                if orgs <= args.baseline_max_orgs:
                    rows.append(measure_side(child, "baseline", 1))
    return rows


@dataclass
class Child:
    """The arguments and environment of the measuring children of one sandbox."""

    orgs: int
    delay_ms: float
    settings_file: Path
    env: dict[str, str]
    watched: dict[str, list[int]]
    timeout: float

    def run(self, side: str) -> dict:
        figures = run_child(side, self.orgs, self.delay_ms, self.settings_file,
                            self.env, self.watched, self.timeout)
        figures["load_1min"] = os.getloadavg()[0]
        return figures


def measure_side(child: Child, side: str, repeats: int) -> Row:
    """Measure one side `repeats` times and keep the run with the median wall time."""
    runs = []
    for _ in range(repeats):
        figures = child.run(side)
        print(f"  {side}: {figures['wall_s']:.1f} s, verdict {figures['verdict']}",
              flush=True)
        for example in figures["not_passing_examples"]:
            print(f"    not passing: {example}", flush=True)
        for message in figures.get("warnings", []):
            print(f"    logged: {message}", flush=True)
        runs.append(figures)
    runs.sort(key=lambda figures: figures["wall_s"])
    median = runs[len(runs) // 2]
    row = Row(side=side, orgs=child.orgs, delay_ms=child.delay_ms,
              **{name: median.get(name) for name in ROW_FIGURES})
    row.wall_range = (runs[0]["wall_s"], runs[-1]["wall_s"])
    row.peak_rss_mb = max(figures["peak_rss_mb"] for figures in runs)
    if any(figures["verdict"] != "pass" for figures in runs):
        worst = next(f for f in runs if f["verdict"] != "pass")
        row.verdict, row.not_passing = worst["verdict"], worst["not_passing"]
    return row


def extrapolate_baseline(rows: list[Row], sizes: list[int],
                         delays: list[float]) -> list[Row]:
    """Add baseline rows for the unmeasured sizes by linear extrapolation.

    The line runs through the two largest measured sizes at the same delay
    (through the origin when only one size was measured). Wall time, queries
    and requests are extrapolated. Peak RSS and the verdict are not.
    """
    added = []
    for delay in delays:
        measured = sorted((r for r in rows if r.side == "baseline"
                           and r.delay_ms == delay), key=lambda r: r.orgs)
        if not measured:
            continue
        for orgs in sizes:
            if any(r.orgs == orgs for r in measured):
                continue
            added.append(Row(
                side="baseline", orgs=orgs, delay_ms=delay,
                wall_s=extend_line(measured, orgs, "wall_s"),
                task_runs=0,
                kql_queries=round(extend_line(measured, orgs, "kql_queries")),
                http_requests=round(extend_line(measured, orgs, "http_requests")),
                peak_rss_mb=None, verdict="n/a", extrapolated=True,
            ))
    return rows + added


def extend_line(measured: list[Row], orgs: int, name: str) -> float:
    last = measured[-1]
    if len(measured) == 1:
        return getattr(last, name) * orgs / last.orgs
    first = measured[-2]
    slope = (getattr(last, name) - getattr(first, name)) / (last.orgs - first.orgs)
    return getattr(last, name) + slope * (orgs - last.orgs)


def find_row(rows: list[Row], side: str, orgs: int, delay: float) -> Row | None:
    return next((r for r in rows if (r.side, r.orgs, r.delay_ms)
                 == (side, orgs, delay)), None)


def render_table(rows: list[Row]) -> list[str]:
    """Return the figures as a Markdown table, audit rows first."""
    lines = [
        (
            "| side | orgs | delay (ms) | wall (s) | task runs | KQL queries "
            "| HTTP requests | peak RSS (MB) | verdict |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    order = {"audit": 0, "baseline": 1}
    for row in sorted(rows, key=lambda r: (order[r.side], r.delay_ms, r.orgs)):
        wall = f"{row.wall_s:.1f}"
        if row.wall_range:
            low, high = (f"{seconds:.1f}" for seconds in row.wall_range)
            if low != high:
                wall += f" ({low}-{high})"
        if row.extrapolated:
            wall = f"{wall} (extrapolated)"
        rss = "n/a" if row.peak_rss_mb is None else f"{row.peak_rss_mb:.0f}"
        requests = "unknown" if row.http_requests is None else str(row.http_requests)
        lines.append(
            f"| {row.side} | {row.orgs:,} | {row.delay_ms:g} | {wall} "
            f"| {row.task_runs} | {row.kql_queries} | {requests} | {rss} "
            f"| {row.verdict} |"
        )
    return lines


def render_ratios(rows: list[Row], sizes: list[int],
                  delays: list[float]) -> list[str]:
    """Return one line per size and delay: baseline wall time over audit wall time."""
    lines = []
    for delay in delays:
        for orgs in sizes:
            audit = find_row(rows, "audit", orgs, delay)
            baseline = find_row(rows, "baseline", orgs, delay)
            if audit is None or baseline is None:
                continue
            label = " (baseline extrapolated)" if baseline.extrapolated else ""
            lines.append(f"- {orgs:,} orgs at {delay:g} ms: "
                         f"{baseline.wall_s / audit.wall_s:.1f}x{label}")
    return lines


def render_time_split(rows: list[Row], sizes: list[int]) -> list[str]:
    """Return the CPU seconds per process of each measured row, then the audit's
    task run times at the largest size."""
    lines = [
        (
            "| side | orgs | delay (ms) | wall (s) | CPU bench process (s) "
            "| CPU sandbox (s) | CPU Prefect server (s) | load average after |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.cpu_s is None:
            continue
        cpu = [f"{row.cpu_s.get(label, 0):.1f}"
               for label in ("bench", "sandbox", "prefect-server")]
        lines.append(f"| {row.side} | {row.orgs:,} | {row.delay_ms:g} "
                     f"| {row.wall_s:.1f} | " + " | ".join(cpu)
                     + f" | {row.load_1min:.1f} |")
    lines.append("")
    largest = max(sizes)
    for row in rows:
        if row.side != "audit" or row.orgs != largest or not row.task_seconds:
            continue
        ranked = sorted(row.task_seconds.items(), key=lambda item: -item[1])
        tasks = ", ".join(f"{name} {seconds:.1f}" for name, seconds in ranked)
        lines.append(f"- audit task run times (s) at {largest:,} orgs and "
                     f"{row.delay_ms:g} ms: {tasks}.")
    return lines


def evaluate_targets(rows: list[Row], sizes: list[int],
                     delays: list[float]) -> list[str]:
    """Return one line per target, saying whether it was met and by what figure."""
    largest = max(sizes)
    audits = [r for r in rows if r.side == "audit"]
    lines = []

    fast = find_row(rows, "audit", largest, 0)
    if fast is None:
        lines.append(f"- {largest:,} orgs within {TARGET_WALL_SECONDS:.0f} s at "
                     "0 ms: not measured (no 0 ms run).")
    else:
        met = "met" if fast.wall_s <= TARGET_WALL_SECONDS else "NOT met"
        lines.append(f"- {largest:,} orgs within {TARGET_WALL_SECONDS:.0f} s with "
                     f"a warm Prefect server at 0 ms: {met} ({fast.wall_s:.1f} s).")

    delayed = max((d for d in delays if d > 0), default=None)
    audit = find_row(rows, "audit", largest, delayed)
    baseline = find_row(rows, "baseline", largest, delayed)
    if audit is None or baseline is None:
        lines.append(f"- at least {TARGET_SPEEDUP:.0f}x faster than the baseline "
                     "with a delay: not measured.")
    else:
        ratio = baseline.wall_s / audit.wall_s
        met = "met" if ratio >= TARGET_SPEEDUP else "NOT met"
        note = ", baseline extrapolated" if baseline.extrapolated else ""
        lines.append(f"- at least {TARGET_SPEEDUP:.0f}x faster than the baseline at "
                     f"{largest:,} orgs and {delayed:g} ms: {met} "
                     f"({ratio:.1f}x{note}).")

    worst = max(audits, key=lambda r: r.peak_rss_mb)
    met = "met" if worst.peak_rss_mb < TARGET_RSS_MB else "NOT met"
    lines.append(f"- audit peak RSS under {TARGET_RSS_MB:.0f} MB: {met} (largest "
                 f"{worst.peak_rss_mb:.0f} MB, at {worst.orgs:,} orgs and "
                 f"{worst.delay_ms:g} ms).")

    task_runs = sorted({r.task_runs for r in audits})
    queries = sorted({r.kql_queries for r in audits})
    constant = len(task_runs) == 1 and len(queries) == 1
    met = "met" if constant else "NOT met"
    lines.append(f"- audit task runs and KQL queries constant in the number of "
                 f"orgs: {met} (task runs {task_runs}, queries {queries}).")
    failing = [r for r in rows if not r.extrapolated and r.verdict != "pass"]
    for row in failing:
        problems = ", ".join(f"{key} x{count}"
                             for key, count in (row.not_passing or {}).items())
        lines.append(f"- every measured run passes: NOT met ({row.side} at "
                     f"{row.orgs:,} orgs and {row.delay_ms:g} ms: {row.verdict}; "
                     f"{problems}).")
    return lines


def describe_code() -> str:
    """Return the commit the run measured, and whether tracked files differed."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short",
                                 "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                  "--untracked-files=no"], capture_output=True,
                                 text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "- code: not a git checkout"
    state = "with uncommitted changes" if changed else "no uncommitted changes"
    return f"- code: commit {commit}, {state} to tracked files"


def describe_machine() -> list[str]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"- CPUs available (nproc): {len(os.sched_getaffinity(0))}",
        f"- CPU model: {cpu_model}",
        f"- Python {platform.python_version()}, {platform.platform()}",
        f"- load average (1, 5, 15 min) at the start: {load}",
    ]


def render_section(args: argparse.Namespace, rows: list[Row], started: datetime,
                   machine: list[str], total_s: float) -> str:
    """Return the generated section of docs/benchmarks.md."""
    command = shlex.join([".venv/bin/python", "bench/audit_scale.py",
                          *args.command_args])
    lines = [
        DOC_BEGIN,
        "## Isolation audit at scale",
        "",
        f"Command: `{command}`",
        "",
        (
            f"Run on {started:%Y-%m-%d %H:%M} UTC. The whole run took "
            f"{total_s / 60:.1f} minutes."
        ),
        "",
        *machine,
        "",
        *render_table(rows),
        "",
        "Baseline wall time over audit wall time:",
        "",
        *render_ratios(rows, args.sizes, args.delays),
        "",
        "Targets:",
        "",
        *evaluate_targets(rows, args.sizes, args.delays),
        "",
        (
            "CPU time spent during each measurement, by process, and the "
            "audit's task run times from its run history:"
        ),
        "",
        *render_time_split(rows, args.sizes),
        "",
        DOC_END,
    ]
    return "\n".join(lines)


def write_doc(section: str, path: Path = DOC_PATH) -> None:
    """Replace the generated section of `path`, or create the file around it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        text = path.read_text()
    else:
        text = "# Benchmarks\n\n" + DOC_BEGIN + "\n" + DOC_END + "\n"
    if DOC_BEGIN not in text or DOC_END not in text:
        text = text.rstrip("\n") + "\n\n" + DOC_BEGIN + "\n" + DOC_END + "\n"
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    path.write_text(head + section + tail)


def run_bench(args: argparse.Namespace) -> int:
    started = datetime.now(UTC)
    clock = time.perf_counter()
    machine = [describe_code(), *describe_machine()]
    with tempfile.TemporaryDirectory(prefix="ue-bench-") as workdir:
        home = Path(workdir) / "prefect-home"
        home.mkdir()
        server = PrefectServer(home)
        try:
            print(f"Prefect server at {server.url}", flush=True)
            rows = measure_all(args, server, Path(workdir))
        finally:
            server.stop()
    rows = extrapolate_baseline(rows, args.sizes, args.delays)
    total_s = time.perf_counter() - clock

    section = render_section(args, rows, started, machine, total_s)
    print()
    print(section.replace(DOC_BEGIN, "").replace(DOC_END, "").strip())
    if args.write_doc:
        write_doc(section)
        print(f"\nwrote {DOC_PATH.relative_to(REPO)}")
    return 0


def parse_watched(values: list[str]) -> dict[str, list[int]]:
    """Parse `LABEL=PID,PID` values into {label: [pid, ...]}."""
    watched = {}
    for value in values:
        label, _, pids = value.partition("=")
        watched[label] = [int(pid) for pid in pids.split(",") if pid]
    return watched


def parse_list(text: str, kind):
    return [kind(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=lambda t: parse_list(t, int),
                        default=list(SIZES),
                        help="Comma-separated org counts (default: 10,100,1000).")
    parser.add_argument("--delays", type=lambda t: parse_list(t, float),
                        default=list(DELAYS_MS),
                        help="Comma-separated per-request delays in milliseconds "
                        "(default: 0,20).")
    parser.add_argument("--baseline-max-orgs", type=int, default=None,
                        help="Measure the baseline only up to this many orgs and "
                        "extrapolate larger sizes linearly (default: measure all).")
    parser.add_argument("--audit-repeats", type=int, default=3,
                        help="Audit runs per size and delay; the table shows the "
                        "median wall time and the range (default: 3).")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="Seconds one measurement may take (default: 3600).")
    parser.add_argument("--no-doc", dest="write_doc", action="store_false",
                        help="Print the results without updating docs/benchmarks.md.")
    parser.add_argument("--measure", choices=("audit", "baseline"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--orgs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--delay-ms", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--settings-file", help=argparse.SUPPRESS)
    parser.add_argument("--watch", action="append", default=[],
                        help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.measure:
        os.environ.update(json.loads(Path(args.settings_file).read_text()))
        measure = measure_audit if args.measure == "audit" else measure_baseline
        figures = measure(parse_watched(args.watch))
        if figures["orgs"] != args.orgs:
            raise BenchError(f"{args.measure} covered {figures['orgs']} orgs, "
                             f"expected {args.orgs}")
        figures["delay_ms"] = args.delay_ms
        print(json.dumps(figures), flush=True)
        return 0
    if args.baseline_max_orgs is None:
        args.baseline_max_orgs = max(args.sizes)
    args.command_args = argv
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
