"""`ue-pilot evidence report`: flow runs from the Prefect API joined to evidence
records in Azurite, written as Markdown, HTML and a PNG timeline.

One sandbox with storage serves the module. Its flow runs are a real isolation
audit and three scripted audits. A scripted audit is a flow registered as
`isolation-audit` that writes the checks it is given, so statuses change from
run to run. Two export-all runs leave no record: one fails on a bad export
name, the other crashes before it starts. One more record, three days old, is
written directly and belongs to no flow run.

The session's Prefect server is shared with other test modules, which may run
flows for the same sandbox org ids. So the tests look for the run ids made
here instead of counting runs.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import struct
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient
from browser import local_page
from click.testing import CliRunner
from PIL import Image
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Crashed, Pending

from flows.export_all import export_all
from flows.isolation_audit import isolation_audit
from tasks.evidence import write_evidence_record
from ue_pilot.cli import main
from ue_pilot.evidence_records import append_record, build_body, record_name
from ue_pilot.evidence_report import (
    NO_RECORD,
    FlowRunInfo,
    InvalidSinceError,
    RecordInfo,
    build_report,
    concerns_org,
    parse_since,
    status_changes,
    write_report,
)
from ue_pilot.evidence_verify import ChainReport, StoredRecord
from ue_pilot.sandbox.runner import SandboxProcess
from ue_pilot.settings import Settings

ORG = "org_sandbox0001"
OTHER_ORG = "org_sandbox0002"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAIL_COLOUR = (0xC6, 0x28, 0x28)

# Statuses of the scripted audits, in run order: the first fails health.ready,
# the second fails rls.fail_open and fixes health.ready, the third is
# inconclusive on telemetry.liveness only.
SCRIPTED = [
    {"rls.fail_open": "pass", "health.ready": "fail", "telemetry.liveness": "pass"},
    {"rls.fail_open": "fail", "health.ready": "pass", "telemetry.liveness": "pass"},
    {"rls.fail_open": "pass", "health.ready": "pass",
     "telemetry.liveness": "inconclusive"},
]


@flow(name="isolation-audit")
def scripted_audit(orgs: list[str], statuses: dict[str, str]) -> dict:
    """Write one record per org with the given statuses, as an audit run would.

    Each check's observed value contains a probe session token, which the
    record must mask.
    """
    settings = Settings()
    token = settings.probe_session_map()[ORG]["member"]
    checks = [
        {"id": check_id, "status": status, "summary": f"scripted {status}",
         "observed": {"token": token}}
        for check_id, status in statuses.items()
    ]
    entry = {org: {"checks": checks} for org in orgs}
    return write_evidence_record(settings, "isolation-audit", entry)


def run_id_of(result: dict, org: str) -> str:
    """Return the flow run id in the name of the org's record in a flow result."""
    records = (result.get("evidence") or result)["records"]
    return records[org]["record"].split("/")[4]


@pytest.fixture(scope="module")
def sandbox():
    with SandboxProcess(orgs=2, storage=True) as running:
        yield running


@pytest.fixture(scope="module")
def container(sandbox):
    service = BlobServiceClient.from_connection_string(
        sandbox.env["UE_SANDBOX_BLOB_CONNECTION_STRING"]
    )
    client = service.get_container_client("evidence")
    if not client.exists():
        client.create_container()
    return client


@pytest.fixture(scope="module")
def runs(prefect_server, sandbox, container):
    """Run the module's flows, write the old record, and return their run ids."""
    patch = pytest.MonkeyPatch()
    for name, value in sandbox.env.items():
        patch.setenv(name, value)
    try:
        audit = isolation_audit()
        scripted = [scripted_audit([ORG], statuses) for statuses in SCRIPTED]
        export = export_all(ORG, ["no-such-export"], return_state=True)
        settings = Settings()
        crashed = crash_before_start(settings)
    finally:
        patch.undo()
    return {
        "audit": run_id_of(audit, ORG),
        "audit_verdict": audit["verdict"],
        "scripted": [run_id_of(result, ORG) for result in scripted],
        "export": str(export.state_details.flow_run_id),
        "export_state": export.name,
        "crashed": crashed,
        "old": write_old_record(container, ORG),
        "secrets": settings.secret_values(),
    }


def crash_before_start(settings: Settings) -> str:
    """Create an export-all run of ORG that crashes before it starts.

    This is what a worker whose infrastructure never came up leaves: a Crashed
    run without a record. The state message quotes a probe session token,
    which the report must mask.
    """
    token = settings.probe_session_map()[ORG]["admin"]
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(export_all, parameters={"org_id": ORG},
                                          state=Pending())
        client.set_flow_run_state(
            flow_run.id, Crashed(message=f"container exited 137; env token {token}"),
            force=True,
        )
    return str(flow_run.id)


def write_old_record(container, org: str) -> str:
    """Append a rollback record of a run three days old that Prefect never saw."""
    run_id = f"outside-{uuid.uuid4().hex[:12]}"
    started = datetime.now(UTC) - timedelta(days=3)
    body = build_body(
        org=org, family="rollback",
        name=record_name(org, "rollback", run_id, datetime.now(UTC)),
        run={"flow": "rollback", "flow_run_id": run_id,
             "started": started.isoformat()},
        trigger={"kind": "cli"}, target={}, settings_view={}, checks=[],
        artifacts=[], secrets=[],
    )
    append_record(container, org, body)
    return run_id


@pytest.fixture
def cli_env(ue_env, sandbox, monkeypatch, tmp_path):
    """Point the CLI at the sandbox's storage, away from any .env file."""
    ue_env(sandbox.env)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_report(*args: str):
    return CliRunner().invoke(main, ["evidence", "report", *args])


@pytest.fixture(scope="module")
def report_dir(runs, sandbox, tmp_path_factory):
    """The report of ORG over the last day, written by the command line."""
    folder = tmp_path_factory.mktemp("report")
    output = folder / ORG
    patch = pytest.MonkeyPatch()
    for name in [n for n in os.environ if n.startswith("UE_")]:
        patch.delenv(name)
    for name, value in sandbox.env.items():
        patch.setenv(name, value)
    patch.chdir(folder)
    try:
        result = run_report("--org", ORG, "--since", "1d", "--output", str(output))
    finally:
        patch.undo()
    assert result.exit_code == 0, result.output
    return output


def table_row(markdown: str, run_id: str) -> str:
    """Return the first table line of the Markdown that names `run_id`."""
    rows = [line for line in markdown.splitlines()
            if line.startswith("|") and f"`{run_id}`" in line]
    assert rows, f"no table row names {run_id}"
    return rows[0]


def section(markdown: str, heading: str) -> str:
    """Return the Markdown between `## heading` and the next `## `."""
    start = markdown.index(f"## {heading}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end if end >= 0 else None]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


# The report written by the command line.


def test_report_writes_three_files(report_dir):
    """The command writes report.html, report.md and timeline.png into --output."""
    names = sorted(path.name for path in report_dir.iterdir())
    assert names == ["report.html", "report.md", "timeline.png"]


def test_report_states_chain_first(report_dir):
    """The first section after the period is the chain's verification result."""
    markdown = (report_dir / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", markdown, re.MULTILINE)
    assert headings[0] == "Evidence chain"
    assert "INTACT: 5 record(s) verified, last sequence 5" in markdown


def test_report_joins_real_audit_run(runs, report_dir):
    """The real audit's flow run from the Prefect API carries its record."""
    row = table_row(section((report_dir / "report.md").read_text(), "All runs"),
                    runs["audit"])
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "isolation-audit"
    assert cells[3] == "Completed"
    assert cells[4] == runs["audit_verdict"]
    assert cells[5] == "1"


def test_report_lists_run_without_record(runs, report_dir):
    """The export run that failed before writing shows as Failed, no record."""
    flagged = section((report_dir / "report.md").read_text(),
                      "Runs that failed or were inconclusive")
    row = table_row(flagged, runs["export"])
    assert runs["export_state"] == "Failed"
    assert "| Failed |" in row
    assert NO_RECORD in row
    assert "unknown export" in row


def test_report_lists_run_crashed_before_start(runs, report_dir):
    """A run that crashed before starting is listed with its masked message."""
    flagged = section((report_dir / "report.md").read_text(),
                      "Runs that failed or were inconclusive")
    row = table_row(flagged, runs["crashed"])
    assert "| export-all |" in row
    assert "| Crashed |" in row
    assert "env token \\[redacted\\]" in row
    assert NO_RECORD in row


def test_report_lists_failed_and_inconclusive_verdicts(runs, report_dir):
    """Scripted runs with verdict fail or inconclusive are listed with their checks."""
    flagged = section((report_dir / "report.md").read_text(),
                      "Runs that failed or were inconclusive")
    first, second, third = runs["scripted"]
    assert "verdict fail: health.ready" in table_row(flagged, first)
    assert "verdict fail: rls.fail_open" in table_row(flagged, second)
    assert "verdict inconclusive: telemetry.liveness" in table_row(flagged, third)


def test_report_status_changes(runs, report_dir):
    """A check that turns from pass to fail is newly failing, the reverse fixed."""
    changes = section((report_dir / "report.md").read_text(),
                      "Status changes since the previous run")
    first, second, third = runs["scripted"]
    second_row = table_row(changes, second)
    third_row = table_row(changes, third)
    assert "rls.fail_open (pass to fail)" in second_row
    assert "health.ready (fail to pass)" in second_row
    assert f"`{first}`" in second_row
    assert "telemetry.liveness (pass to inconclusive)" in third_row
    assert "rls.fail_open (fail to pass)" in third_row


def test_report_first_scripted_compares_real_audit(runs, report_dir):
    """The first scripted audit is compared with the real audit before it."""
    changes = section((report_dir / "report.md").read_text(),
                      "Status changes since the previous run")
    row = table_row(changes, runs["scripted"][0])
    assert runs["audit_verdict"] == "pass"
    assert "health.ready (pass to fail)" in row
    assert f"`{runs['audit']}`" in row


def test_report_leaves_out_old_record(runs, report_dir):
    """A record of a run older than --since is verified but not listed."""
    assert runs["old"] not in (report_dir / "report.md").read_text()


def test_report_lists_record_outside_history(runs, cli_env):
    """A record whose flow run Prefect never saw shows as not in run history."""
    result = run_report("--org", ORG, "--since", "7d")
    markdown = (cli_env / "reports" / ORG / "report.md").read_text()
    row = table_row(section(markdown, "All runs"), runs["old"])
    assert result.exit_code == 0, result.output
    assert "| not in run history |" in row
    assert "record(s) belong to flow runs that the Prefect API does not list" in (
        markdown)


def test_report_carries_no_secret(runs, report_dir):
    """No sandbox secret appears in the Markdown, the HTML or the PNG."""
    texts = {path.name: path.read_bytes() for path in report_dir.iterdir()}
    leaks = [(name, secret[:4]) for name, data in texts.items()
             for secret in runs["secrets"] if secret.encode() in data]
    assert len(runs["secrets"]) >= 3
    assert leaks == []


def test_report_html_matches_markdown(runs, report_dir):
    """The HTML has the same sections and run ids, and links the PNG relatively."""
    page = (report_dir / "report.html").read_text()
    assert '<img id="timeline" src="timeline.png"' in page
    assert "<h2>Evidence chain</h2>" in page
    assert f"<code>{runs['export']}</code>" in page
    assert "INTACT: 5 record(s) verified" in page


def test_report_png_is_valid(report_dir):
    """The timeline is a PNG of plausible size that Pillow decodes fully."""
    path = report_dir / "timeline.png"
    width, height = png_size(path)
    with Image.open(path) as image:
        image.verify()
    assert 700 <= width <= 2300
    assert 300 <= height <= 3100


def test_report_png_shows_failures(report_dir):
    """Failed cells (the failed export run, the failing checks) are drawn in red."""
    with Image.open(report_dir / "timeline.png") as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    red = [count for count, colour in colours if colour == FAIL_COLOUR]
    assert red
    assert red[0] > 100


def test_report_other_org_excludes_scripted(runs, sandbox, cli_env):
    """The other org's report has the shared audit but not ORG's own runs."""
    result = run_report("--org", OTHER_ORG, "--since", "1d")
    markdown = (cli_env / "reports" / OTHER_ORG / "report.md").read_text()
    assert result.exit_code == 0, result.output
    assert f"`{runs['audit']}`" in markdown
    assert runs["export"] not in markdown
    assert all(run_id not in markdown for run_id in runs["scripted"])
    assert "INTACT: 1 record(s) verified" in markdown


# Tampered chains, bad input, missing run history.


def test_report_flags_tampered_chain(container, cli_env):
    """A chain with a deleted record still gets a report, flagged, with exit 1."""
    org = "org_rpttamper1"
    names = [append_record(container, org, build_body(
        org=org, family="export", name=record_name(org, "export", f"t{index}",
                                                   datetime.now(UTC)),
        run={"flow_run_id": f"t{index}", "started": datetime.now(UTC).isoformat()},
        trigger={}, target={}, settings_view={},
        checks=[{"id": "export.complete", "status": "pass"}], artifacts=[],
        secrets=[]))["record"] for index in range(3)]
    container.delete_blob(names[1])
    result = run_report("--org", org)
    markdown = (cli_env / "reports" / org / "report.md").read_text()
    chain = section(markdown, "Evidence chain")
    assert result.exit_code == 1, result.output
    assert "chain TAMPERED" in result.output
    assert "TAMPERED: 1 problem(s) in 2 record(s)" in chain
    assert f"deleted: `{names[2]}`" in chain


def test_report_nothing_to_report(runs, cli_env):
    """An org with no record and no run exits 3 and writes nothing.

    The org id is the start of a sandbox org's id, whose records must not count.
    """
    result = run_report("--org", "org_sandbox000", "--since", "1d")
    assert result.exit_code == 3, result.output
    assert "NOTHING TO REPORT" in result.output
    assert not (cli_env / "reports").exists()


@pytest.mark.parametrize("org", ["", "..", "org_*", "org_" + "y" * 80],
                         ids=["empty", "dots", "wildcard", "too-long"])
def test_report_bad_org_rejected(cli_env, org):
    """A bad org id is a usage error (exit 2) and nothing is written."""
    result = run_report("--org", org)
    assert result.exit_code == 2
    assert "invalid org id" in result.output
    assert not (cli_env / "reports").exists()


@pytest.mark.parametrize("since", ["30", "30m", "0d", "d", "-1d", "1.5d", "99999d"],
                         ids=["no-unit", "minutes", "zero", "no-number", "negative",
                              "fraction", "too-long"])
def test_report_bad_since_rejected(cli_env, since):
    """A --since other than whole days or hours is a usage error naming the value."""
    result = run_report("--org", ORG, "--since", since)
    assert result.exit_code == 2
    assert f"invalid --since {since!r}" in result.output
    assert not (cli_env / "reports").exists()


def test_report_without_run_history(runs, cli_env):
    """With the Prefect API unreachable, records are reported, flagged, exit 3."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_CLIENT_MAX_RETRIES,
        temporary_settings,
    )

    closed = free_port()
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{closed}/api",
                             PREFECT_CLIENT_MAX_RETRIES: 0}):
        result = run_report("--org", ORG, "--since", "1d")
    markdown = (cli_env / "reports" / ORG / "report.md").read_text()
    row = table_row(section(markdown, "All runs"), runs["audit"])
    assert result.exit_code == 3, result.output
    assert "INCOMPLETE: the run history could not be read" in markdown
    assert "| run history not read |" in row
    assert runs["export"] not in markdown


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The report in a real browser.


@pytest.fixture
def report_server(report_dir):
    """Serve the report folder over HTTP on 127.0.0.1 and yield its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(report_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_report_renders_in_browser(report_dir, report_server, tmp_path):
    """Headless Chromium shows the report with its timeline picture loaded."""
    blocked: list[str] = []
    screenshot = tmp_path / "report-page.png"
    with local_page(blocked) as page:
        page.goto(f"{report_server}/report.html", wait_until="load")
        image = page.locator("#timeline")
        image.wait_for(state="visible")
        natural_width = image.evaluate("img => img.complete ? img.naturalWidth : 0")
        heading = page.locator("h1").inner_text()
        page.screenshot(path=str(screenshot), full_page=True)
    assert natural_width == png_size(report_dir / "timeline.png")[0]
    assert heading == f"Evidence report of {ORG}"
    assert png_size(screenshot)[0] > 0
    assert blocked == []


# Units without the sandbox.


@pytest.mark.parametrize(("text", "expected"), [
    ("30d", timedelta(days=30)), ("12h", timedelta(hours=12)),
    (" 1d ", timedelta(days=1)), ("3660d", timedelta(days=3660)),
], ids=["days", "hours", "spaces", "maximum"])
def test_parse_since_valid(text, expected):
    """Whole days and hours are accepted."""
    assert parse_since(text) == expected


def test_parse_since_rejects_weeks():
    """A unit other than d or h is rejected with the accepted forms."""
    with pytest.raises(InvalidSinceError, match="such as 30d or 12h"):
        parse_since("2w")


def flow_run(flow_name: str, parameters: dict, **fields) -> FlowRunInfo:
    values = {"id": str(uuid.uuid4()), "flow": flow_name, "name": "run",
              "started": datetime.now(UTC), "state_type": "COMPLETED",
              "state_name": "Completed", "message": "", "parameters": parameters}
    values.update(fields)
    return FlowRunInfo(**values)


@pytest.mark.parametrize(("flow_name", "parameters", "expected"), [
    ("isolation-audit", {"orgs": None}, True),
    ("isolation-audit", {"orgs": [OTHER_ORG]}, False),
    ("isolation-audit", {"orgs": [ORG]}, True),
    ("export-all", {"org_id": ORG}, True),
    ("export-all", {"org_id": ORG + "1"}, False),
    ("rollback", {"org_id": ORG}, True),
    ("onboarding", {"name": "x", "slug": "x"}, False),
], ids=["audit-all", "audit-other", "audit-named", "export", "export-longer-id",
        "rollback", "onboarding"])
def test_concerns_org(flow_name, parameters, expected):
    """A run without a record belongs to the org its parameters name."""
    assert concerns_org(flow_run(flow_name, parameters), ORG, [ORG]) is expected


@pytest.mark.parametrize(("state_type", "state_name", "flagged"), [
    ("COMPLETED", "Completed", True),
    ("FAILED", "TimedOut", True),
    ("CRASHED", "Crashed", True),
    ("CANCELLED", "Cancelled", False),
    ("RUNNING", "Running", False),
], ids=["completed", "timed-out", "crashed", "cancelled", "running"])
def test_missing_record_flagged_by_state(state_type, state_name, flagged):
    """A run without a record is flagged unless it was cancelled or still runs."""
    run = flow_run("export-all", {"org_id": ORG}, state_type=state_type,
                   state_name=state_name)
    report = build_report(ORG, "1d", ChainReport(ORG, [], None), [run], [ORG],
                          datetime.now(UTC))
    assert len(report.runs) == 1
    assert (report.flagged_runs == report.runs) is flagged


def record_info(family: str, sequence: int, statuses: dict) -> RecordInfo:
    return RecordInfo(blob=f"{ORG}/{family}/{sequence}/record.json", sha256="0" * 64,
                      sequence=sequence, family=family, run_id=f"run-{sequence}",
                      flow=None, started=datetime.now(UTC), verdict="pass",
                      statuses=statuses)


def test_status_changes_per_family():
    """A record is compared with the previous one of its own family only."""
    records = [
        record_info("isolation-audit", 1, {"rls.fail_open": "pass"}),
        record_info("export", 2, {"rls.fail_open": "fail"}),
        record_info("isolation-audit", 3, {"rls.fail_open": "inconclusive"}),
    ]
    changes = status_changes(records)
    third = changes[records[2].blob]
    assert records[1].blob not in changes
    assert third.previous_run_id == "run-1"
    assert third.newly_failing == [("rls.fail_open", "pass", "inconclusive")]
    assert third.fixed == []


def synthetic_report(count: int, message: str = "") -> object:
    """Return a report of `count` hourly audit runs, each with a record."""
    now = datetime.now(UTC)
    stored, history = [], []
    for index in range(count):
        run_id = str(uuid.uuid4())
        started = now - timedelta(hours=count - index)
        content = {"org": ORG, "family": "isolation-audit", "sequence": index + 1,
                   "run": {"flow_run_id": run_id, "started": started.isoformat()},
                   "verdict": "fail" if index % 3 else "pass",
                   "checks": [{"id": f"rls.check_{k:02d}",
                               "status": "fail" if (index + k) % 3 == 0 and index % 3
                               else "pass"} for k in range(30)]}
        data = json.dumps(content).encode()
        stored.append(StoredRecord(f"{ORG}/isolation-audit/{run_id}/record.json",
                                   data, "0" * 64, content))
        history.append(flow_run("isolation-audit", {}, id=run_id, started=started,
                                state_type="FAILED" if message else "COMPLETED",
                                state_name="Failed" if message else "Completed",
                                message=message))
    return build_report(ORG, "30d", ChainReport(ORG, stored, None), history, [ORG],
                        now)


def test_timeline_caps_drawn_runs(tmp_path):
    """With 300 runs the picture draws the last 200 and the report states the cap."""
    report = synthetic_report(300)
    write_report(report, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    width, height = png_size(tmp_path / "timeline.png")
    all_runs = section(markdown, "All runs")
    assert "the last 200 of 300 runs are drawn" in markdown
    assert all_runs.count("| isolation-audit |") == 300
    assert width <= 2200
    assert height <= 3000


def test_report_escapes_untrusted_text(tmp_path):
    """Markup in a state message is escaped in both the HTML and the Markdown."""
    report = synthetic_report(2, message="<img src=x onerror=alert(1)> | *bold*")
    write_report(report, tmp_path)
    page = (tmp_path / "report.html").read_text()
    markdown = (tmp_path / "report.md").read_text()
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert r"\<img src=x onerror=alert(1)\> \| \*bold\*" in markdown
