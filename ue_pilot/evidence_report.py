"""Evidence report of one org: its flow runs over a period joined to its evidence
records, written as Markdown and HTML with a PNG timeline of check outcomes.

The inputs are the run history of the four flows that write evidence, read
from the Prefect API, and the org's evidence records in Blob Storage. The
report opens with the verification result of the record chain; a chain that
is not intact is still reported, flagged at the top. Then come the timeline,
the runs that failed, were inconclusive or left no evidence record, and the
checks that changed status since the previous run of the same record family.

Record contents are masked when they are written (`evidence_records`), and
Prefect state messages are masked here, so no secret value reaches the report.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from azure.storage.blob import ContainerClient

from ue_pilot.evidence_timeline import draw_timeline
from ue_pilot.evidence_verify import ChainReport, StoredRecord, verify_chain
from ue_pilot.redact import redact_text
from ue_pilot.report_markup import Block, Code, render_html, render_markdown

# Flow name in Prefect -> family of the records it writes.
FLOW_FAMILIES = {
    "isolation-audit": "isolation-audit",
    "export-all": "export",
    "onboarding": "onboarding",
    "rollback": "rollback",
}
# Prefect state types. TimedOut is a state of type FAILED.
FAILED_STATE_TYPES = ("FAILED", "CRASHED")
# States after which a run should have left a record. Cancelled runs are left
# out, because the audit's catch-up and its deployment's concurrency limit
# cancel runs that never started, on purpose.
RECORD_EXPECTED_STATE_TYPES = ("COMPLETED", "FAILED", "CRASHED")
NOT_IN_HISTORY = "not in run history"
HISTORY_NOT_READ = "run history not read"
NO_RECORD = "no evidence record"
STATUS_RANK = {"pass": 0, "inconclusive": 1, "fail": 2}

SINCE_PATTERN = re.compile(r"([1-9][0-9]{0,5})([dh])")
# A bound that keeps a mistyped --since from reading the whole run history.
MAX_SINCE = timedelta(days=3660)
HISTORY_PAGE_SIZE = 200
MAX_TIMELINE_RUNS = 200
MAX_IDS_IN_CELL = 8
MAX_MESSAGE_CHARS = 200

REPORT_FILES = ("report.html", "report.md", "timeline.png")


class InvalidSinceError(ValueError):
    """A --since value that is not a whole number of days or hours."""


def parse_since(text: str) -> timedelta:
    """Return the period that `30d` or `12h` means.

    Raises InvalidSinceError for any other form, zero, or more than MAX_SINCE.
    """
    match = SINCE_PATTERN.fullmatch(text.strip())
    if match is None:
        raise InvalidSinceError(
            f"invalid --since {text!r}: expected a whole number of days or hours "
            "above zero, such as 30d or 12h"
        )
    number, unit = int(match[1]), match[2]
    span = timedelta(days=number) if unit == "d" else timedelta(hours=number)
    if span > MAX_SINCE:
        raise InvalidSinceError(
            f"invalid --since {text!r}: the maximum is {MAX_SINCE.days}d"
        )
    return span


# Inputs: the run history and the records.


@dataclass
class FlowRunInfo:
    """One flow run as the Prefect API returned it, with its state message masked."""

    id: str
    flow: str
    name: str
    started: datetime | None
    state_type: str | None
    state_name: str
    message: str
    parameters: dict


def read_run_history(since: datetime, secrets: list[str]) -> list[FlowRunInfo]:
    """Read every run of the evidence-writing flows that started at `since` or later.

    The Prefect server (3.9.1, checked here) sets the start time of a run that
    enters a final state without running, so a run that crashed before its
    infrastructure came up is read too. Reads the Prefect API at
    PREFECT_API_URL and raises the client's errors (httpx.HTTPError,
    PrefectHTTPStatusError) unchanged.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterStartTime,
    )

    flow_filter = FlowFilter(name=FlowFilterName(any_=list(FLOW_FAMILIES)))
    run_filter = FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since))
    with get_client(sync_client=True) as client:
        names = {flow.id: flow.name for flow in client.read_flows(
            flow_filter=flow_filter, limit=len(FLOW_FAMILIES))}
        runs = read_all_pages(client, flow_filter, run_filter)
    return [describe_flow_run(run, names, secrets) for run in runs]


def read_all_pages(client, flow_filter, run_filter) -> list:
    """Return every flow run that matches, oldest first, HISTORY_PAGE_SIZE a request."""
    from prefect.client.schemas.sorting import FlowRunSort

    runs: list = []
    while True:
        page = client.read_flow_runs(flow_filter=flow_filter,
                                     flow_run_filter=run_filter,
                                     sort=FlowRunSort.START_TIME_ASC,
                                     limit=HISTORY_PAGE_SIZE, offset=len(runs))
        runs += page
        if len(page) < HISTORY_PAGE_SIZE:
            return runs


def describe_flow_run(run, flow_names: dict, secrets: list[str]) -> FlowRunInfo:
    state = run.state
    message = redact_text((state.message if state else None) or "", secrets)
    return FlowRunInfo(
        id=str(run.id),
        flow=flow_names.get(run.flow_id, str(run.flow_id)),
        name=run.name,
        started=as_utc(run.start_time or run.expected_start_time),
        state_type=run.state_type.value if run.state_type else None,
        state_name=run.state_name or "unknown",
        message=message[:MAX_MESSAGE_CHARS],
        parameters=dict(run.parameters or {}),
    )


@dataclass
class RecordInfo:
    """The parts of one evidence record that the report uses."""

    blob: str
    sha256: str
    sequence: int | None
    family: str
    run_id: str | None
    flow: str | None
    started: datetime | None
    verdict: str
    statuses: dict[str, str]


def describe_record(stored: StoredRecord) -> RecordInfo | None:
    """Return the record's run, verdict and worst status per check id.

    Returns None for a record that is not a JSON object; verification reports
    it as edited.
    """
    content = stored.content
    if content is None:
        return None
    run = content.get("run") if isinstance(content.get("run"), dict) else {}
    checks = content.get("checks") if isinstance(content.get("checks"), list) else []
    started = parse_time(run.get("started")) or parse_time(content.get("recorded"))
    return RecordInfo(
        blob=stored.blob,
        sha256=stored.sha256,
        sequence=stored.sequence,
        family=str(content.get("family", "unknown")),
        run_id=str(run["flow_run_id"]) if run.get("flow_run_id") else None,
        flow=run.get("flow"),
        started=started,
        verdict=str(content.get("verdict", "unknown")),
        statuses=worst_statuses(checks),
    )


def worst_statuses(checks: Iterable[object]) -> dict[str, str]:
    """Return the worst status of each check id (fail, then inconclusive, then pass).

    A check that runs once per export or per scope appears several times in a
    record, so the report shows one outcome per check id and run.
    """
    statuses: dict[str, str] = {}
    for check in checks:
        if not isinstance(check, dict) or check.get("status") not in STATUS_RANK:
            continue
        check_id, status = str(check.get("id")), check["status"]
        if STATUS_RANK[status] >= STATUS_RANK.get(statuses.get(check_id), -1):
            statuses[check_id] = status
    return dict(sorted(statuses.items()))


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return as_utc(datetime.fromisoformat(value))
    except ValueError:
        return None


def as_utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


# Joining runs to records.


@dataclass
class StatusChange:
    """Checks whose status changed since the previous record of the same family."""

    previous_run_id: str | None
    newly_failing: list[tuple[str, str, str]]
    fixed: list[tuple[str, str, str]]


@dataclass
class ReportRun:
    """One flow run of the org in the period, with its record when one exists."""

    run_id: str
    flow: str
    started: datetime | None
    state_name: str
    state_type: str | None
    message: str = ""
    record: RecordInfo | None = None
    change: StatusChange | None = None

    @property
    def verdict(self) -> str:
        return self.record.verdict if self.record else NO_RECORD

    @property
    def failed(self) -> bool:
        return self.state_type in FAILED_STATE_TYPES

    @property
    def missing_record(self) -> bool:
        """True for a completed, failed or crashed run without a record for the org."""
        return self.record is None and self.state_type in RECORD_EXPECTED_STATE_TYPES

    def findings(self) -> list[str]:
        """Return why the run is listed among the failed and inconclusive runs."""
        reasons = []
        if self.failed:
            reasons.append(f"state {self.state_name}: {self.message or 'no message'}")
        if self.record and self.record.verdict in ("fail", "inconclusive"):
            ids = [i for i, s in self.record.statuses.items() if s != "pass"]
            listed = f": {shorten_ids(ids)}" if ids else ""
            reasons.append(f"verdict {self.record.verdict}{listed}")
        if self.missing_record:
            reasons.append(NO_RECORD)
        return reasons


def concerns_org(run: FlowRunInfo, org: str, pilot_orgs: list[str]) -> bool:
    """Tell from its parameters whether a run without a record was meant for `org`.

    An isolation audit without `orgs` covers every pilot org, and the pilot
    orgs are read from today's settings. An onboarding run creates its org id,
    so its parameters never name one.
    """
    if run.flow == "isolation-audit":
        requested = run.parameters.get("orgs")
        return org in requested if requested else org in pilot_orgs
    if run.flow in ("export-all", "rollback"):
        return run.parameters.get("org_id") == org
    return False


def join_runs(
    org: str,
    since: datetime,
    history: list[FlowRunInfo] | None,
    records: list[RecordInfo],
    pilot_orgs: list[str],
) -> tuple[list[ReportRun], int]:
    """Return the org's runs in the period in time order, each with its record.

    Runs of the history join records by flow run id. A record whose run the
    history lacks is kept as a run "not in run history", or "run history not
    read" when `history` is None. Also returns the number of onboarding runs
    left out because they have no record to show which org they created.
    """
    by_run_id = {record.run_id or record.blob: record
                 for record in order_records(records)}
    runs, unattributed = [], 0
    for flow_run in history or []:
        record = by_run_id.pop(flow_run.id, None)
        if record is None and not concerns_org(flow_run, org, pilot_orgs):
            if flow_run.flow == "onboarding":
                unattributed += 1
            continue
        runs.append(ReportRun(flow_run.id, flow_run.flow, flow_run.started,
                              flow_run.state_name, flow_run.state_type,
                              flow_run.message, record))
    state = NOT_IN_HISTORY if history is not None else HISTORY_NOT_READ
    for record in by_run_id.values():
        if record.started is not None and record.started >= since:
            runs.append(ReportRun(record.run_id or record.blob,
                                  record.flow or record.family, record.started,
                                  state, None, "", record))
    runs.sort(key=lambda run: (run.started or since, run.run_id))
    return runs, unattributed


def order_records(records: list[RecordInfo]) -> list[RecordInfo]:
    """Sort records into chain order; records without a sequence go by time."""
    last = max((r.sequence for r in records if r.sequence is not None), default=0)
    return sorted(records, key=lambda r: (
        r.sequence if r.sequence is not None else last + 1,
        r.started or datetime.min.replace(tzinfo=UTC),
        r.blob,
    ))


def status_changes(records: list[RecordInfo]) -> dict[str, StatusChange]:
    """Compare each record with the previous record of its family, by blob name.

    Newly failing: pass before, fail or inconclusive now. Fixed: the reverse.
    A check id missing from either record is not compared.
    """
    previous_by_family: dict[str, RecordInfo] = {}
    changes = {}
    for record in order_records(records):
        previous = previous_by_family.get(record.family)
        previous_by_family[record.family] = record
        if previous is None:
            continue
        common = sorted(set(previous.statuses) & set(record.statuses))
        pairs = [(i, previous.statuses[i], record.statuses[i]) for i in common]
        changes[record.blob] = StatusChange(
            previous_run_id=previous.run_id,
            newly_failing=[p for p in pairs if p[1] == "pass" and p[2] != "pass"],
            fixed=[p for p in pairs if p[1] != "pass" and p[2] == "pass"],
        )
    return changes


# The report.


@dataclass
class EvidenceReport:
    """Everything the Markdown, HTML and timeline show for one org and period."""

    org: str
    since_text: str
    since: datetime
    until: datetime
    chain: ChainReport
    runs: list[ReportRun]
    history_error: str | None = None
    unattributed_runs: int = 0
    unreadable_records: int = 0
    timeline_cap: int = MAX_TIMELINE_RUNS

    @property
    def flagged_runs(self) -> list[ReportRun]:
        return [run for run in self.runs if run.findings()]

    @property
    def changed_runs(self) -> list[ReportRun]:
        return [run for run in self.runs
                if run.change and (run.change.newly_failing or run.change.fixed)]

    @property
    def complete(self) -> bool:
        """True when the run history was read and every record was readable."""
        return self.history_error is None and not self.unreadable_records


def build_report(
    org: str,
    since_text: str,
    chain: ChainReport,
    history: list[FlowRunInfo] | None,
    pilot_orgs: list[str],
    now: datetime,
    history_error: str | None = None,
) -> EvidenceReport:
    """Join the verified chain and the run history into the report of `org`.

    `history` is None when the Prefect API could not be read. `history_error`
    then contains the reason, and the report lists the records only.
    """
    since = now - parse_since(since_text)
    records = [r for r in map(describe_record, chain.records) if r is not None]
    runs, unattributed = join_runs(org, since, history, records, pilot_orgs)
    changes = status_changes(records)
    for run in runs:
        if run.record is not None:
            run.change = changes.get(run.record.blob)
    return EvidenceReport(
        org=org,
        since_text=since_text,
        since=since,
        until=now,
        chain=chain,
        runs=runs,
        history_error=history_error,
        unattributed_runs=unattributed,
        unreadable_records=len(chain.records) - len(records),
    )


def produce_report(
    container: ContainerClient,
    org: str,
    since_text: str,
    pilot_orgs: list[str],
    secrets: list[str],
    directory: Path,
) -> tuple[EvidenceReport, list[Path]]:
    """Verify the org's chain, read the run history, and write the report files.

    Returns the report and the files written, an empty list when the org has
    neither a record nor a run in the period.
    """
    now = datetime.now(UTC)
    chain = verify_chain(container, org)
    history, error = collect_history(now - parse_since(since_text), secrets)
    report = build_report(org, since_text, chain, history, pilot_orgs, now, error)
    if not report.runs and chain.status == "empty":
        return report, []
    return report, write_report(report, directory)


def collect_history(
    since: datetime, secrets: list[str]
) -> tuple[list[FlowRunInfo] | None, str | None]:
    """Return the run history, or None and the reason it could not be read."""
    from prefect.exceptions import PrefectException

    try:
        return read_run_history(since, secrets), None
    except (httpx.HTTPError, PrefectException, OSError, RuntimeError) as error:
        reason = redact_text(str(error).splitlines()[0] if str(error) else "", secrets)
        return None, f"{type(error).__name__}: {reason[:MAX_MESSAGE_CHARS]}"


def exit_status(report: EvidenceReport, written: list[Path]) -> int:
    """Return 1 for a chain not intact, 3 for no report or an incomplete one, else 0."""
    if report.chain.status == "tampered":
        return 1
    if not written or not report.complete:
        return 3
    return 0


def summary_lines(report: EvidenceReport, written: list[Path]) -> list[str]:
    """Summarize the report for the terminal."""
    if not written:
        return [f"Evidence report of {report.org}: NOTHING TO REPORT (no evidence "
                f"record and no run since {when(report.since)})"]
    lines = [
        f"Evidence report of {report.org}: chain {report.chain.status.upper()}, "
        f"{len(report.runs)} run(s) since {when(report.since)}, "
        f"{len(report.flagged_runs)} failed, inconclusive or without a record, "
        f"{len(report.changed_runs)} with status changes",
    ]
    if report.history_error:
        lines.append(f"Run history not read: {report.history_error}")
    lines += [f"Wrote {path}" for path in written]
    return lines


def write_report(report: EvidenceReport, directory: Path) -> list[Path]:
    """Write report.html, report.md and timeline.png into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    drawn = report.runs[-report.timeline_cap:]
    draw_timeline(drawn, len(report.runs), timeline_title(report),
                  directory / "timeline.png")
    blocks = report_blocks(report)
    (directory / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
    (directory / "report.html").write_text(
        render_html(blocks, f"Evidence report of {report.org}"), encoding="utf-8"
    )
    return [directory / name for name in REPORT_FILES]


def timeline_title(report: EvidenceReport) -> str:
    total = len(report.runs)
    title = f"Check outcomes of {report.org}, {total} run(s) since {when(report.since)}"
    if total > report.timeline_cap:
        title += f"; the last {report.timeline_cap} of {total} runs are drawn"
    return title


# Report content, as blocks both renderers share.


def report_blocks(report: EvidenceReport) -> list[Block]:
    return [
        Block("heading", f"Evidence report of {report.org}", level=1),
        Block("paragraph", f"Period: {when(report.since)} to {when(report.until)} "
                           f"(--since {report.since_text})."),
        *chain_blocks(report.chain),
        *summary_blocks(report),
        *timeline_blocks(report),
        *flagged_blocks(report),
        *change_blocks(report),
        *run_table_blocks(report),
    ]


def chain_blocks(chain: ChainReport) -> list[Block]:
    """State the chain's verification result: intact, tampered, or no records."""
    blocks = [Block("heading", "Evidence chain")]
    ordered = chain.chain()
    last = ordered[-1] if ordered else None
    if chain.status == "empty":
        blocks.append(Block("paragraph", "NO RECORDS: the org has no evidence "
                                         "record in Blob Storage."))
    elif chain.status == "intact":
        blocks.append(Block("paragraph", [
            f"INTACT: {len(chain.records)} record(s) verified, last sequence "
            f"{last.sequence}, sha256 ", Code(last.sha256), "."]))
    else:
        blocks.append(Block("paragraph", [
            f"TAMPERED: {len(chain.problems)} problem(s) in {len(chain.records)} "
            "record(s). The report below still shows every readable record, but "
            "edited, deleted or reordered records make it unreliable. Run ",
            Code(f"ue-pilot evidence verify --org {chain.org}"), " for details."]))
        blocks.append(Block("list", items=[
            [f"{p.kind}: ", Code(p.record), f": {p.detail}"] for p in chain.problems]))
    if chain.notes:
        blocks.append(Block("list", items=[f"Note: {note}" for note in chain.notes]))
    return blocks


def summary_blocks(report: EvidenceReport) -> list[Block]:
    runs = report.runs
    items = [
        f"{len(runs)} run(s) in the period, {sum(1 for r in runs if r.record)} with "
        "an evidence record.",
        f"{sum(1 for r in runs if r.verdict == 'fail')} run(s) with verdict fail, "
        f"{sum(1 for r in runs if r.verdict == 'inconclusive')} inconclusive.",
        f"{len(report.changed_runs)} run(s) changed the status of a check.",
        *history_items(report),
    ]
    if report.unreadable_records:
        items.append(f"INCOMPLETE: {report.unreadable_records} record(s) are not "
                     "readable JSON and are left out.")
    if report.unattributed_runs:
        items.append(f"{report.unattributed_runs} onboarding run(s) without an "
                     "evidence record are left out: without one, nothing shows "
                     "which org they created.")
    return [Block("heading", "Summary"), Block("list", items=items)]


def history_items(report: EvidenceReport) -> list[str]:
    """Summarize what the run history shows, or state that it could not be read."""
    if report.history_error:
        return [f"INCOMPLETE: the run history could not be read "
                f"({report.history_error}), so failed runs and runs without an "
                "evidence record are unknown; only evidence records are listed."]
    runs = report.runs
    items = [
        f"{sum(1 for r in runs if r.failed)} run(s) ended Failed, Crashed or "
        "TimedOut.",
        f"{sum(1 for r in runs if r.missing_record)} completed, failed or crashed "
        "run(s) left no evidence record.",
    ]
    not_in_history = sum(1 for r in runs if r.state_name == NOT_IN_HISTORY)
    if not_in_history:
        items.append(f"{not_in_history} record(s) belong to flow runs that the "
                     "Prefect API does not list (deleted from the run history, or "
                     "written outside it).")
    return items


def timeline_blocks(report: EvidenceReport) -> list[Block]:
    text = ("One column per run, oldest first, and one row per check id. A cell "
            "is the check's worst outcome in that run, or absent when the run "
            "has no such check. The top rows show the run's Prefect state "
            "(pass: Completed, fail: Failed or Crashed, inconclusive: any other "
            "state, absent: not in the run history) and whether it left an "
            "evidence record.")
    if len(report.runs) > report.timeline_cap:
        text += (f" Only the last {report.timeline_cap} of {len(report.runs)} "
                 "runs are drawn; the tables below list all of them.")
    return [
        Block("heading", "Timeline"),
        Block("image", "timeline.png", items=[timeline_title(report)]),
        Block("paragraph", text),
    ]


def flagged_blocks(report: EvidenceReport) -> list[Block]:
    blocks = [Block("heading", "Runs that failed or were inconclusive")]
    flagged = report.flagged_runs
    if not flagged:
        return blocks + [Block("paragraph", "None.")]
    rows = [[when(run.started), run.flow, Code(run.run_id), run.state_name,
             run.verdict, "; ".join(run.findings())] for run in flagged]
    return blocks + [Block("table", header=["Started", "Flow", "Run", "State",
                                            "Verdict", "Why"], rows=rows)]


def change_blocks(report: EvidenceReport) -> list[Block]:
    blocks = [Block("heading", "Status changes since the previous run"),
              Block("paragraph", "Each record is compared with the org's previous "
                                 "record of the same family. Newly failing: pass "
                                 "before, fail or inconclusive now. Fixed: the "
                                 "reverse.")]
    changed = report.changed_runs
    if not changed:
        return blocks + [Block("paragraph", "No check changed status.")]
    rows = [[when(run.started), run.record.family, Code(run.run_id),
             change_cell(run.change.newly_failing), change_cell(run.change.fixed),
             Code(run.change.previous_run_id or "")] for run in changed]
    return blocks + [Block("table", header=["Started", "Family", "Run",
                                            "Newly failing", "Fixed",
                                            "Previous run"], rows=rows)]


def run_table_blocks(report: EvidenceReport) -> list[Block]:
    blocks = [Block("heading", "All runs")]
    if not report.runs:
        return blocks + [Block("paragraph", "No run in the period.")]
    rows = [[when(run.started), run.flow, Code(run.run_id), run.state_name,
             run.verdict, str(run.record.sequence) if run.record else ""]
            for run in report.runs]
    return blocks + [Block("table", header=["Started", "Flow", "Run", "State",
                                            "Verdict", "Sequence"], rows=rows)]


def change_cell(pairs: list[tuple[str, str, str]]) -> str:
    described = [f"{check_id} ({before} to {after})"
                 for check_id, before, after in pairs]
    return shorten_ids(described)


def shorten_ids(ids: list[str]) -> str:
    if len(ids) <= MAX_IDS_IN_CELL:
        return ", ".join(ids)
    return ", ".join(ids[:MAX_IDS_IN_CELL]) + f" and {len(ids) - MAX_IDS_IN_CELL} more"


def when(moment: datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC" if moment else "unknown"
