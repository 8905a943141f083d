"""Benchmark the export-all flow against curl plus a plain SDK upload.

For each size the script starts a sandbox with Azurite and that many extra
reward rows for org_sandbox0001, then measures two sides against it, one after
the other, in `--rounds` rounds:

- baseline: what the runbook does by hand. curl fetches the CSV export with
  the org's admin session into a file, then a child process uploads the file
  with `BlobClient.upload_blob`. Its time is the sum of the two steps.
- flow: the real `export_all` flow in a child process, reporting to a warm
  Prefect server that this script starts on 127.0.0.1 with a temporary
  PREFECT_HOME (one warm-up run before the first measurement).

Every round's manifest must carry the size and SHA-256 of that round's curl
file. The last round's blobs are downloaded and hashed up to
`--download-max-bytes`; above that only their sizes are compared. Unless
`--no-profile` is given, a last child runs `tasks.exports.fetch_into` under
cProfile at the largest size.

Every request goes to the sandbox, Azurite or the Prefect server, all on
127.0.0.1. Proxy variables are removed from the children's environment.

Run: .venv/bin/python bench/export_throughput.py [--sizes 100000,1000000,10000000]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import os
import platform
import pstats
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

# Prefect reads its settings when it is first imported, in the functions below.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
ORG = "org_sandbox0001"
EXPORT = "rewards"
EXPORT_PATH = "/api/v2/rewards/export"
BASELINE_FOLDER = "bench-baseline"

SIZES = (100_000, 1_000_000, 10_000_000)
DOC_PATH = REPO / "docs" / "benchmarks.md"
DOC_BEGIN = "<!-- export-throughput:begin -->"
DOC_END = "<!-- export-throughput:end -->"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
# httpcore reads at most 64 KiB per socket read, so the flow's scanner receives
# chunks of up to this size. The offline timing feeds chunks of the same size.
CHUNK_BYTES = 64 * 1024

# Targets: flow throughput over baseline throughput, and the flow child's peak RSS.
TARGET_RATIO = 0.7
TARGET_RSS_MIB = 200.0
# Fractions of the flow run at which the report shows the RSS reached so far.
RSS_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


# Child side: one measurement, printed as one JSON line.


def peak_rss_mib() -> float:
    """Return this process's peak resident set size (VmHWM), in MiB.

    `ru_maxrss` is not used. Python 3.11 starts children with vfork, and Linux
    carries the parent's peak RSS into the child's `ru_maxrss` at exec. A child
    of a large parent thus reports at least the parent's peak. VmHWM belongs to
    the address space that exec created.
    """
    return read_status_kib("VmHWM") / 1024


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int) -> float:
    """Return the user and system CPU seconds process `pid` has used so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0.0
    # The fields after the command name start at field 3 of proc(5), so
    # utime (14) and stime (15) are at indexes 11 and 12, in clock ticks.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """Return the CPU seconds all CPUs of the machine spent busy since boot.

    Busy is every field of the `cpu` line of /proc/stat but idle and iowait.
    """
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(value) for value in fields]
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


class CpuClock:
    """CPU seconds spent by this process, watched processes and the machine.

    `watched` maps a label to process ids whose CPU time is summed under it.
    """

    def __init__(self, watched: dict[str, list[int]]) -> None:
        self.watched = watched
        self.before = self._read()

    def _read(self) -> dict[str, float]:
        cpu = {"self": own_cpu_seconds(), "machine": machine_busy_seconds()}
        for label, pids in self.watched.items():
            cpu[label] = sum(cpu_seconds(pid) for pid in pids)
        return cpu

    def elapsed(self) -> dict[str, float]:
        after = self._read()
        return {label: after[label] - self.before[label] for label in after}


class RssSampler:
    """Samples this process's resident set size every `interval` seconds.

    The samples show whether memory levels off during an export or keeps
    growing with the bytes streamed, which the peak alone cannot tell.
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.perf_counter()
        while not self._stop.wait(self.interval):
            self.samples.append((time.perf_counter() - started, current_rss_mib()))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def at_fractions(self, fractions: tuple[float, ...]) -> list[float]:
        """Return the highest RSS among the first `fraction` of the samples, each."""
        if not self.samples:
            return []
        highest = []
        for fraction in fractions:
            count = max(1, round(len(self.samples) * fraction))
            highest.append(max(rss for _, rss in self.samples[:count]))
        return highest


def current_rss_mib() -> float:
    return read_status_kib("VmRSS") / 1024


def read_status_kib(name: str) -> int:
    """Return one memory field of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise BenchError(f"/proc/self/status has no {name} field")


def measure_flow(watched: dict[str, list[int]]) -> dict:
    """Run export-all for the rewards export once and return its figures."""
    from flows.export_all import export_all

    clock = CpuClock(watched)
    started = time.perf_counter()
    with RssSampler() as sampler:
        state = export_all(ORG, exports=[EXPORT], return_state=True)
    wall_s = time.perf_counter() - started
    cpu_s = clock.elapsed()

    # Raises the flow's own exception when the run failed.
    manifest = state.result()
    entry = manifest["exports"][0]
    window = datetime.fromisoformat(entry["finished"]) - datetime.fromisoformat(
        entry["started"]
    )
    return {
        "wall_s": wall_s,
        "manifest_s": window.total_seconds(),
        "task_run_s": read_task_run_seconds(state.state_details.flow_run_id),
        "cpu_s": cpu_s,
        "peak_rss_mib": peak_rss_mib(),
        "rss_quarters_mib": sampler.at_fractions(RSS_FRACTIONS),
        "blob": entry["blob"],
        "bytes": entry["bytes"],
        "rows": entry["rows"],
        "sha256": entry["sha256"],
    }


def read_task_run_seconds(flow_run_id, timeout: float = 30.0) -> dict[str, float]:
    """Map each task of the flow run to its run time, from the Prefect API.

    Prefect 3 reports task run states in the background, so the read repeats
    until every task run has an end time or `timeout` seconds have passed.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=timeout)
    runs_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            task_runs = client.read_task_runs(flow_run_filter=runs_filter)
            ended = bool(task_runs) and all(run.end_time for run in task_runs)
            if ended or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    # Task run names are the task's name and a generated suffix after a dash.
    return {
        run.name.rsplit("-", 1)[0]: (run.end_time - run.start_time).total_seconds()
        for run in task_runs
        if run.start_time and run.end_time
    }


def measure_upload(path: Path, blob_name: str, watched: dict[str, list[int]]) -> dict:
    """Upload `path` the plain way, with the SDK's default upload options."""
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(
        os.environ["UE_BLOB_CONNECTION_STRING"]
    )
    blob = service.get_blob_client(os.environ["UE_BLOB_CONTAINER"], blob_name)
    clock = CpuClock(watched)
    started = time.perf_counter()
    with open(path, "rb") as data:
        blob.upload_blob(data, overwrite=True)
    wall_s = time.perf_counter() - started
    return {"wall_s": wall_s, "cpu_s": clock.elapsed(), "peak_rss_mib": peak_rss_mib()}


def profile_fetch(path: Path, blob_name: str, top: int) -> dict:
    """Profile one `fetch_into` and the commit of its blocks with cProfile.

    cProfile records only the calling thread, so block uploads appear as waits
    for a free upload slot. Before that, the scanner and the two hashes are
    timed alone over the curl file at `path`, without the network and without
    the profiler's per-call overhead.
    """
    from tasks.blob_storage import open_container
    from tasks.exports import CsvScanner, RowScan, fetch_into
    from ue_pilot.settings import Settings

    offline = time_offline_work(path, CsvScanner, RowScan)
    settings = Settings()
    container = open_container(settings)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    _, upload, _ = fetch_into(container, settings, ORG, EXPORT, EXPORT_PATH, blob_name)
    fetched_s = time.perf_counter() - started
    upload.commit({"status": "profile"})
    profiler.disable()
    wall_s = time.perf_counter() - started
    return {
        "wall_s": wall_s,
        "fetch_s": fetched_s,
        "offline_s": offline,
        "functions": top_functions(pstats.Stats(profiler), top),
    }


def time_offline_work(path: Path, scanner_class, scan_class) -> dict[str, float]:
    """Time the flow's per-byte work on a local file: scanner, hashes, reads."""
    timings = {}
    started = time.perf_counter()
    with open(path, "rb") as file:
        while file.read(CHUNK_BYTES):
            pass
    timings["read file in 64 KiB chunks"] = time.perf_counter() - started

    scanner = scanner_class(scan_class(ORG, "org_id"))
    started = time.perf_counter()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            scanner.feed(chunk)
    scanner.finish()
    timings["CsvScanner.feed (and the read)"] = time.perf_counter() - started

    sha256, md5 = hashlib.sha256(), hashlib.md5()
    started = time.perf_counter()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            sha256.update(chunk)
            md5.update(chunk)
    timings["sha256 and md5 (and the read)"] = time.perf_counter() - started
    return timings


def top_functions(stats: pstats.Stats, top: int) -> list[dict]:
    """Return the `top` functions by own time, with their calls and total time."""
    ranked = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:top]
    functions = []
    for (filename, line, name), (_, calls, own, total, _) in ranked:
        # Built-in functions have the file name "~" and line 0.
        label = f"{Path(filename).name}:{line}({name})" if line else name
        functions.append(
            {"function": label, "calls": calls, "own_s": own, "total_s": total}
        )
    return functions


# Parent side: the Prefect server, the sandboxes, the baseline and the report.


class BenchError(RuntimeError):
    """A measurement, the Prefect server, a sandbox or a verification failed."""


class PrefectServer:
    """`prefect server start` on 127.0.0.1 with a temporary PREFECT_HOME (SQLite)."""

    def __init__(self, home: Path, startup_timeout: float = 180.0) -> None:
        from ue_pilot.sandbox.servers import find_free_port

        self.home = home
        self.port = find_free_port()
        self.url = f"http://{LOOPBACK}:{self.port}/api"
        self.log_path = home / "server.log"
        env = without_proxies(os.environ)
        env.update(
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="false",
        )
        env.pop("PREFECT_API_URL", None)
        command = [
            str(Path(sys.executable).parent / "prefect"),
            "server",
            "start",
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--no-ui",
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        # Its own process group, because the CLI runs uvicorn as a child.
        self.process = subprocess.Popen(
            command,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self._wait_until_healthy(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_until_healthy(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                response = httpx.get(f"{self.url}/health", timeout=5, trust_env=False)
                if response.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        log = self.log_path.read_text(errors="replace")[-3000:]
        raise BenchError(
            f"the Prefect server on port {self.port} did not respond "
            f"to GET /api/health within {timeout:.0f} s; its log "
            f"ends with:\n{log}"
        )

    def pids(self) -> list[int]:
        return process_tree(self.process.pid)

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


def children_cpu_seconds() -> float:
    """Return the CPU seconds of this process's children that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_tree(pid: int) -> list[int]:
    """Return `pid` and the ids of all its descendants."""
    found = [pid]
    for parent in found:
        for task in Path(f"/proc/{parent}/task").iterdir():
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def is_azurite(pid: int) -> bool:
    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    return b"azurite" in command


def without_proxies(environ) -> dict[str, str]:
    """Return a copy of `environ` without proxy variables, in either case."""
    return {
        name: value
        for name, value in environ.items()
        if name.lower() not in PROXY_VARIABLES
    }


def write_private(path: Path, text: str) -> Path:
    """Write `text`, which contains secrets, to a file only this user can read."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    return path


def sha256_file(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def sha256_blob(container, name: str) -> tuple[int, str]:
    """Download a blob in chunks and return its size and SHA-256."""
    digest, size = hashlib.sha256(), 0
    for chunk in container.get_blob_client(name).download_blob().chunks():
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


@dataclass
class Round:
    """One baseline (curl, then upload) and one flow run, back to back."""

    curl_s: float
    upload_s: float
    upload_rss_mib: float
    flow_wall_s: float
    export_task_s: float
    manifest_s: float
    other_tasks_s: float
    flow_rss_mib: float
    flow_rss_quarters_mib: list[float]
    cpu_s: dict[str, dict[str, float]]
    load_1min: dict[str, float]

    @property
    def baseline_s(self) -> float:
        return self.curl_s + self.upload_s


@dataclass
class Measurement:
    """The rounds measured at one size, and how their blobs were checked."""

    rows_added: int
    sandbox_start_s: float
    export_bytes: int = 0
    export_sha256: str = ""
    export_rows: int = 0
    rounds: list[Round] = field(default_factory=list)
    verified: dict[str, str] = field(default_factory=dict)
    profile: dict | None = None

    def median(self, name: str) -> float:
        return statistics.median(getattr(r, name) for r in self.rounds)

    def spread(self, name: str) -> tuple[float, float]:
        values = [getattr(r, name) for r in self.rounds]
        return min(values), max(values)

    def ratio(self, name: str) -> float:
        """Return the flow's throughput over the baseline's, from the medians."""
        return self.median("baseline_s") / self.median(name)


@dataclass
class SizeRun:
    """One sandbox and the files and children measured against it."""

    env: dict[str, str]
    workdir: Path
    child_env: dict[str, str]
    watched: dict[str, list[int]]
    timeout: float

    def run_child(self, mode: str, *extra: str) -> dict:
        """Run one measurement in a child process and return its JSON figures."""
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--measure",
            mode,
            "--settings-file",
            str(self.workdir / "ue-settings.json"),
            *extra,
        ]
        for label, pids in self.watched.items():
            command += ["--watch", f"{label}=" + ",".join(map(str, pids))]
        try:
            done = subprocess.run(
                command,
                env=self.child_env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"{mode} timed out after {self.timeout:.0f} s") from None
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise BenchError(
                f"{mode} failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
            )
        return json.loads(lines[-1])

    def run_curl(self, path: Path) -> tuple[float, dict[str, float]]:
        """Fetch the export with curl into `path` and return its wall and CPU seconds.

        The session header is read from a private file, so the token does not
        show in the process list.
        """
        url = f"{self.env['UE_BASE_URL']}{EXPORT_PATH}?orgId={ORG}&format=csv"
        headers = self.workdir / "curl-headers"
        token = json.loads(self.env["UE_PROBE_SESSIONS"])[ORG]["admin"]
        write_private(headers, f"Authorization: Bearer {token}\n")
        command = [
            "curl",
            "-s",
            "--fail",
            "--noproxy",
            "*",
            "-o",
            str(path),
            "-H",
            f"@{headers}",
            url,
        ]
        clock = CpuClock(self.watched)
        before = children_cpu_seconds()
        started = time.perf_counter()
        done = subprocess.run(
            command, env=without_proxies(os.environ), timeout=self.timeout, check=False
        )
        wall_s = time.perf_counter() - started
        cpu_s = clock.elapsed()
        # curl's own CPU time replaces this process's, which did nothing but wait.
        cpu_s["self"] = children_cpu_seconds() - before
        if done.returncode != 0:
            raise BenchError(f"curl of {url} failed with exit {done.returncode}")
        return wall_s, cpu_s


def start_sandbox(rows: int, timeout: float):
    """Start a sandbox with storage and `rows` bulk rewards, and time its start."""
    from ue_pilot.sandbox.runner import SandboxProcess

    started = time.perf_counter()
    sandbox = SandboxProcess(orgs=2, storage=True, bulk_rewards=rows, timeout=timeout)
    return sandbox, time.perf_counter() - started


def open_evidence_container(env: dict[str, str]):
    """Return the sandbox's evidence container, created if missing."""
    from azure.core.exceptions import ResourceExistsError

    from ue_pilot.storage import build_blob_service

    service = build_blob_service(connection_string=env["UE_BLOB_CONNECTION_STRING"])
    container = service.get_container_client(env["UE_BLOB_CONTAINER"])
    try:
        container.create_container()
    except ResourceExistsError:
        pass
    return container


def child_environment(server: PrefectServer) -> dict[str, str]:
    """Return this process's environment without UE_ and proxy settings."""
    env = {
        name: value
        for name, value in without_proxies(os.environ).items()
        if not name.startswith("UE_")
    }
    env.update(
        PREFECT_API_URL=server.url,
        PREFECT_HOME=str(server.home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env


def measure_size(
    args: argparse.Namespace,
    rows: int,
    server: PrefectServer,
    workdir: Path,
    warm_up: bool,
    profile: bool,
) -> Measurement:
    """Start one sandbox and measure rounds of the baseline and the flow on it."""
    print(f"sandbox with {rows:,} bulk rows ...", flush=True)
    sandbox, start_s = start_sandbox(rows, args.sandbox_timeout)
    with sandbox:
        print(f"  started in {start_s:.1f} s", flush=True)
        write_private(workdir / "ue-settings.json", json.dumps(sandbox.env))
        tree = process_tree(sandbox.process.pid)
        run = SizeRun(
            env=sandbox.env,
            workdir=workdir,
            child_env=child_environment(server),
            watched={
                "sandbox": [sandbox.process.pid],
                "azurite": [pid for pid in tree if is_azurite(pid)],
                "prefect-server": server.pids(),
            },
            timeout=args.timeout,
        )
        container = open_evidence_container(sandbox.env)
        if warm_up:
            warm = run.run_child("flow")
            print(f"  warm-up flow run: {warm['wall_s']:.1f} s", flush=True)
        result = Measurement(rows_added=rows, sandbox_start_s=start_s)
        export_file = workdir / "export.csv"
        try:
            flow_blob = ""
            for number in range(1, args.rounds + 1):
                print(f"  round {number} of {args.rounds}", flush=True)
                flow_blob = measure_round(run, export_file, result)
            verify_blobs(container, flow_blob, result, args.download_max_bytes)
            if profile:
                print("  profiling fetch_into ...", flush=True)
                result.profile = run.run_child(
                    "profile",
                    "--file",
                    str(export_file),
                    "--blob",
                    f"{BASELINE_FOLDER}/{rows}/profiled.csv",
                    "--top",
                    str(args.profile_top),
                )
        finally:
            export_file.unlink(missing_ok=True)
    return result


def baseline_blob_name(rows: int) -> str:
    return f"{BASELINE_FOLDER}/{rows}/{EXPORT}.csv"


def measure_round(run: SizeRun, export_file: Path, result: Measurement) -> str:
    """Measure the baseline, then the flow, and append the round to `result`.

    Raises BenchError when the curl file differs from the first round's, or
    the flow's manifest from the curl file. Returns the flow's blob name.
    """
    load = {}
    cpu = {}
    curl_s, cpu["curl"] = run.run_curl(export_file)
    load["curl"] = os.getloadavg()[0]
    check_curl_file(export_file, result)
    upload = run.run_child(
        "upload",
        "--file",
        str(export_file),
        "--blob",
        baseline_blob_name(result.rows_added),
    )
    cpu["upload"] = upload["cpu_s"]
    load["upload"] = os.getloadavg()[0]
    print(
        f"    baseline: curl {curl_s:.1f} s, upload {upload['wall_s']:.1f} s, "
        f"upload peak RSS {upload['peak_rss_mib']:.0f} MiB",
        flush=True,
    )

    flow = run.run_child("flow")
    cpu["flow"] = flow["cpu_s"]
    load["flow"] = os.getloadavg()[0]
    if (flow["bytes"], flow["sha256"]) != (result.export_bytes, result.export_sha256):
        raise BenchError(
            f"the flow's manifest has {flow['bytes']} bytes, sha256 "
            f"{flow['sha256']}, but the curl file has {result.export_bytes} bytes, "
            f"sha256 {result.export_sha256}"
        )
    result.export_rows = flow["rows"]
    tasks = flow["task_run_s"]
    export_task_s = tasks.get("export-to-blob", 0.0)
    result.rounds.append(
        Round(
            curl_s=curl_s,
            upload_s=upload["wall_s"],
            upload_rss_mib=upload["peak_rss_mib"],
            flow_wall_s=flow["wall_s"],
            export_task_s=export_task_s,
            manifest_s=flow["manifest_s"],
            other_tasks_s=sum(tasks.values()) - export_task_s,
            flow_rss_mib=flow["peak_rss_mib"],
            flow_rss_quarters_mib=flow["rss_quarters_mib"],
            cpu_s=cpu,
            load_1min=load,
        )
    )
    print(
        f"    flow: wall {flow['wall_s']:.1f} s, export task {export_task_s:.1f} s, "
        f"manifest window {flow['manifest_s']:.1f} s, peak RSS "
        f"{flow['peak_rss_mib']:.0f} MiB",
        flush=True,
    )
    return flow["blob"]


def check_curl_file(export_file: Path, result: Measurement) -> None:
    """Record the first curl file's size and hash; later ones must match them."""
    size = export_file.stat().st_size
    sha = sha256_file(export_file)
    if not result.export_sha256:
        result.export_bytes, result.export_sha256 = size, sha
        print(f"    curl file: {size:,} bytes", flush=True)
    elif (size, sha) != (result.export_bytes, result.export_sha256):
        raise BenchError(
            f"the export changed between rounds: {size} bytes, sha256 {sha}, "
            f"after {result.export_bytes} bytes, sha256 {result.export_sha256}"
        )


def verify_blobs(
    container, flow_blob: str, result: Measurement, download_max_bytes: int
) -> None:
    """Check the last round's blobs against the curl file, raising BenchError if not.

    Each round's manifest was already compared with its curl file. Records in
    `result.verified` how each side was checked.
    """
    expected = (result.export_bytes, result.export_sha256)
    blobs = {"flow": flow_blob, "baseline": baseline_blob_name(result.rows_added)}
    problems = []
    if result.export_bytes <= download_max_bytes:
        for side, name in blobs.items():
            size, sha = sha256_blob(container, name)
            if (size, sha) != expected:
                problems.append(f"{side} blob {size} bytes, sha256 {sha}")
        result.verified = dict.fromkeys(blobs, "downloaded: size and sha256 match")
    else:
        for side, name in blobs.items():
            size = container.get_blob_client(name).get_blob_properties().size
            if size != result.export_bytes:
                problems.append(f"{side} blob {size} bytes")
        result.verified = {
            "flow": "blob size and manifest sha256 match",
            "baseline": "blob size matches",
        }
    if problems:
        raise BenchError(
            f"export of {result.rows_added:,} rows: the curl file has "
            f"{result.export_bytes} bytes, sha256 {result.export_sha256}, but "
            + "; ".join(problems)
        )
    print(
        f"  verified: flow {result.verified['flow']}, "
        f"baseline {result.verified['baseline']}",
        flush=True,
    )


# The report.


def megabytes_per_second(size: int, seconds: float) -> float:
    return size / seconds / 1e6 if seconds else 0.0


def format_median(result: Measurement, name: str) -> str:
    """Return the median of a round figure, with the range when it varies."""
    text = f"{result.median(name):.1f}"
    low, high = (f"{value:.1f}" for value in result.spread(name))
    return text if low == high else f"{text} ({low}-{high})"


def render_tables(results: list[Measurement]) -> list[str]:
    lines = [
        (
            "| rows added | export MB | curl (s) | upload (s) | baseline (s) "
            "| export task (s) | flow wall (s) | baseline MB/s | task MB/s "
            "| flow MB/s | task / baseline | flow / baseline |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        speeds = [
            megabytes_per_second(r.export_bytes, r.median(name))
            for name in ("baseline_s", "export_task_s", "flow_wall_s")
        ]
        lines.append(
            f"| {r.rows_added:,} | {r.export_bytes / 1e6:.1f} "
            f"| {format_median(r, 'curl_s')} | {format_median(r, 'upload_s')} "
            f"| {format_median(r, 'baseline_s')} "
            f"| {format_median(r, 'export_task_s')} "
            f"| {format_median(r, 'flow_wall_s')} | "
            + " | ".join(f"{speed:.1f}" for speed in speeds)
            + f" | {r.ratio('export_task_s'):.2f}x | {r.ratio('flow_wall_s'):.2f}x |"
        )
    return lines


def render_memory_and_checks(results: list[Measurement]) -> list[str]:
    lines = [
        (
            "| rows added | export rows | manifest window (s) | other tasks (s) "
            "| flow peak RSS (MiB) | flow RSS by quarter of the run (MiB) "
            "| upload peak RSS (MiB) | flow blob | baseline blob |"
        ),
        "|---:|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for r in results:
        highest = max(r.rounds, key=lambda one: one.flow_rss_mib)
        quarters = " / ".join(f"{rss:.0f}" for rss in highest.flow_rss_quarters_mib)
        upload_rss = max(one.upload_rss_mib for one in r.rounds)
        lines.append(
            f"| {r.rows_added:,} | {r.export_rows:,} "
            f"| {format_median(r, 'manifest_s')} "
            f"| {format_median(r, 'other_tasks_s')} | {highest.flow_rss_mib:.0f} "
            f"| {quarters} | {upload_rss:.0f} | {r.verified['flow']} "
            f"| {r.verified['baseline']} |"
        )
    return lines


def render_cpu(result: Measurement) -> list[str]:
    """Return the CPU seconds each process used during each step of each round."""
    lines = [
        (
            "| round | step | wall (s) | measured process | sandbox app "
            "| Azurite | Prefect server | rest of machine | whole machine "
            "| load average after |"
        ),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    listed = ("self", "sandbox", "azurite", "prefect-server")
    for number, one in enumerate(result.rounds, start=1):
        steps = (
            ("curl", one.curl_s),
            ("upload", one.upload_s),
            ("flow", one.flow_wall_s),
        )
        for step, wall in steps:
            cpu = one.cpu_s[step]
            rest = cpu["machine"] - sum(cpu[label] for label in listed)
            lines.append(
                f"| {number} | {step} | {wall:.1f} | {cpu['self']:.1f} "
                f"| {cpu['sandbox']:.1f} | {cpu['azurite']:.1f} "
                f"| {cpu['prefect-server']:.1f} | {rest:.1f} "
                f"| {cpu['machine']:.1f} | {one.load_1min[step]:.1f} |"
            )
    return lines


def render_profile(result: Measurement) -> list[str]:
    profile = result.profile
    if not profile:
        return []
    lines = [
        (
            f"Profile of `tasks.exports.fetch_into` and the commit of its blocks "
            f"at {result.rows_added:,} rows, under cProfile: "
            f"{profile['wall_s']:.1f} s ({profile['fetch_s']:.1f} s until the "
            "stream ended). cProfile slows every Python call, so these times are "
            "larger than in the flow run."
        ),
        "",
        "| function | calls | own time (s) | total time (s) |",
        "|---|---:|---:|---:|",
    ]
    for entry in profile["functions"]:
        lines.append(
            f"| `{entry['function']}` | {entry['calls']:,} "
            f"| {entry['own_s']:.1f} | {entry['total_s']:.1f} |"
        )
    lines += [
        "",
        (
            "The flow's per-byte work timed alone over the curl file, without "
            "the network and the profiler:"
        ),
        "",
    ]
    for step, seconds in profile["offline_s"].items():
        lines.append(f"- {step}: {seconds:.1f} s")
    return lines


def evaluate_targets(results: list[Measurement]) -> list[str]:
    lines = []
    for label, name in (
        ("export task time", "export_task_s"),
        ("flow wall time", "flow_wall_s"),
    ):
        ratios = [(r, r.ratio(name)) for r in results]
        lowest = min(ratio for _, ratio in ratios)
        met = "met" if lowest >= TARGET_RATIO else "NOT met"
        shown = ", ".join(
            f"{r.export_bytes / 1e6:.0f} MB {ratio:.2f}x" for r, ratio in ratios
        )
        lines.append(
            f"- flow throughput at least {TARGET_RATIO}x the baseline's at every "
            f"size, by {label}: {met} ({shown})."
        )
    peaks = [max(one.flow_rss_mib for one in r.rounds) for r in results]
    met = "met" if max(peaks) < TARGET_RSS_MIB else "NOT met"
    lines.append(
        f"- flow child's peak RSS under {TARGET_RSS_MIB:.0f} MiB at every size: "
        f"{met} ({min(peaks):.0f} to {max(peaks):.0f} MiB)."
    )
    return lines


def describe_machine() -> list[str]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        describe_code(),
        f"- CPUs available (nproc): {len(os.sched_getaffinity(0))}",
        f"- CPU model: {cpu_model}",
        f"- Python {platform.python_version()}, {platform.platform()}",
        f"- load average (1, 5, 15 min) at the start: {load}",
    ]


def describe_code() -> str:
    """Return the commit the run measured, and whether tracked files differed."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "- code: not a git checkout"
    state = "with uncommitted changes" if changed else "no uncommitted changes"
    return f"- code: commit {commit}, {state} to tracked files"


def render_method(args: argparse.Namespace) -> list[str]:
    """Return the description of what the figures measure."""
    rounds = "one round" if args.rounds == 1 else f"{args.rounds} rounds"
    text = f"""\
`bench/export_throughput.py` measures the export-all flow on exports of
{ORG}'s rewards into Azurite. Each size gets its own sandbox (2 orgs,
Azurite, and the extra reward rows inserted once), and {rounds} of the two
sides, one after the other:

- **baseline**: what the runbook does by hand.
  `curl -s --fail --noproxy '*' -o FILE -H @HEADERS URL` fetches
  `{EXPORT_PATH}?orgId={ORG}&format=csv`, where the header file holds
  `Authorization: Bearer <admin session of {ORG}>`. Then a child process
  calls `upload_blob(open(FILE, "rb"), overwrite=True)` on a `BlobClient` of
  `BlobServiceClient.from_connection_string`, with the SDK's default upload
  options. Its time is the curl time plus the upload call's time.
- **flow**: `export_all("{ORG}", exports=["{EXPORT}"])` in a child process,
  reporting to a warm Prefect server that the script starts on 127.0.0.1
  with a temporary PREFECT_HOME (one warm-up run first). The flow wall time
  is the flow call alone, without the child's start-up and imports. The
  export task time is the `export-to-blob` task run's time from start to end
  in the Prefect API. The task opens the container, fetches, scans, hashes
  and uploads the export, and commits the block list. The manifest window is
  the manifest entry's `started` to `finished`. `finished` is taken when the
  stream ends, before the last blocks are committed, so the window is
  slightly shorter.

How to read the tables:

- Times are the median of the rounds, with the range in brackets when the
  rounds differ. Throughput is bytes over the median time, in MB/s of
  10^6 bytes. A ratio is the median baseline time over the median flow
  time, which is the flow's throughput over the baseline's.
- Peak RSS is VmHWM of the measuring child, in MiB. `ru_maxrss` is not
  used: Python 3.11 starts children with vfork, and Linux then carries the
  parent's peak RSS into the child's `ru_maxrss` at exec. RSS by quarter is
  the highest RSS sampled every 0.25 s up to each quarter of the flow call,
  in the round with the highest peak.
- Every round's manifest must carry the size and SHA-256 of that round's
  curl file. After the last round both blobs are downloaded and hashed up to
  {args.download_max_bytes:,} bytes. Above that only the blobs' sizes are
  compared with the curl file's. The flow's SHA-256 is then the one in its
  manifest, which the flow computed over the bytes it uploaded.
- In the CPU table, the rest of the machine is the busy CPU time in
  /proc/stat less the listed processes. It includes the PostgreSQL backend
  that serves the export, and any other job on the machine."""
    return text.splitlines()


def render_section(
    args: argparse.Namespace,
    results: list[Measurement],
    started: datetime,
    machine: list[str],
    total_s: float,
) -> str:
    command = shlex.join(
        [".venv/bin/python", "bench/export_throughput.py", *args.command_args]
    )
    lines = [
        DOC_BEGIN,
        "## Export throughput",
        "",
        *render_method(args),
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
        *render_tables(results),
        "",
        *render_memory_and_checks(results),
        "",
        "Targets:",
        "",
        *evaluate_targets(results),
        "",
        (
            f"CPU seconds used during each timed step at {results[-1].rows_added:,} "
            "rows, by process:"
        ),
        "",
        *render_cpu(results[-1]),
        "",
        *render_profile(results[-1]),
        "",
        DOC_END,
    ]
    return "\n".join(lines)


def write_doc(section: str, path: Path = DOC_PATH) -> None:
    """Replace this benchmark's section of `path`, or append it at the end."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        _, tail = rest.split(DOC_END, 1)
        path.write_text(head + section + tail)
    else:
        path.write_text(text.rstrip("\n") + "\n\n" + section + "\n")


def run_bench(args: argparse.Namespace) -> int:
    started = datetime.now(UTC)
    clock = time.perf_counter()
    machine = describe_machine()
    results = []
    with tempfile.TemporaryDirectory(prefix="ue-export-bench-") as workdir:
        home = Path(workdir) / "prefect-home"
        home.mkdir()
        server = PrefectServer(home)
        try:
            print(f"Prefect server at {server.url}", flush=True)
            for index, rows in enumerate(args.sizes):
                results.append(
                    measure_size(
                        args,
                        rows,
                        server,
                        Path(workdir),
                        warm_up=index == 0,
                        profile=args.profile and index == len(args.sizes) - 1,
                    )
                )
        finally:
            server.stop()
    total_s = time.perf_counter() - clock

    section = render_section(args, results, started, machine, total_s)
    print()
    print(section.replace(DOC_BEGIN, "").replace(DOC_END, "").strip())
    if args.write_doc:
        write_doc(section)
        print(f"\nwrote {DOC_PATH.relative_to(REPO)}")
    return 0


def run_measurement(args: argparse.Namespace) -> int:
    """Run one measurement in this child process and print it as JSON."""
    os.environ.update(json.loads(Path(args.settings_file).read_text()))
    watched = parse_watched(args.watch)
    if args.measure == "flow":
        figures = measure_flow(watched)
    elif args.measure == "upload":
        figures = measure_upload(Path(args.file), args.blob, watched)
    else:
        figures = profile_fetch(Path(args.file), args.blob, args.top)
    print(json.dumps(figures), flush=True)
    return 0


def parse_watched(values: list[str]) -> dict[str, list[int]]:
    """Parse `LABEL=PID,PID` values into {label: [pid, ...]}."""
    watched = {}
    for value in values:
        label, _, pids = value.partition("=")
        watched[label] = [int(pid) for pid in pids.split(",") if pid]
    return watched


def parse_sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=list(SIZES),
        help="Comma-separated numbers of bulk reward rows, one "
        "sandbox each (default: 100000,1000000,10000000).",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="Rounds of baseline, then flow, per size. The tables show medians "
        "and ranges (default: 3).",
    )
    parser.add_argument(
        "--download-max-bytes",
        type=int,
        default=500_000_000,
        help="Download and hash blobs up to this many bytes. Above it, compare "
        "sizes and the manifest's sha256 (default: 500000000).",
    )
    parser.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="Skip the cProfile run of fetch_into at the largest size.",
    )
    parser.add_argument(
        "--profile-top",
        type=int,
        default=15,
        help="Functions listed from the profile (default: 15).",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="Seconds one measurement may take (default: 900).",
    )
    parser.add_argument(
        "--sandbox-timeout",
        type=float,
        default=600.0,
        help="Seconds a sandbox may take to insert its rows and start (default: 600).",
    )
    parser.add_argument(
        "--no-doc",
        dest="write_doc",
        action="store_false",
        help="Print the results without updating docs/benchmarks.md.",
    )

    # Options of the measuring children, which the parent passes.
    parser.add_argument(
        "--measure", choices=("flow", "upload", "profile"), help=argparse.SUPPRESS
    )
    parser.add_argument("--settings-file", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--blob", help=argparse.SUPPRESS)
    parser.add_argument("--top", type=int, default=15, help=argparse.SUPPRESS)
    parser.add_argument("--watch", action="append", default=[], help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.measure:
        return run_measurement(args)
    args.command_args = argv
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
