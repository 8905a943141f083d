"""Progress of long work: the hub, the throttled reporter, the terminal line, the
export's progress artifacts and the CLI without a terminal."""

from __future__ import annotations

import io
import logging

import pytest
from click.testing import CliRunner

from ue_pilot.progress import (
    ERASE_LINE,
    ProgressHub,
    ProgressLine,
    ProgressReporter,
    ProgressUpdate,
    artifact_key,
    format_bytes,
    percent_of,
    terminal_progress,
)
from ue_pilot.sandbox.runner import SandboxProcess

ORG = "org_sandbox0001"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    """A text stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


def recording_hub() -> tuple[ProgressHub, list[ProgressUpdate]]:
    received: list[ProgressUpdate] = []
    return ProgressHub([received.append]), received


def update(key: str = "export-progress-rewards", percent: float | None = 40.0,
           finished: bool = False) -> ProgressUpdate:
    return ProgressUpdate(key, "export rewards", percent, "2.0 kB, 20 rows",
                          finished=finished)


# The hub


def test_hub_publishes_to_every_subscriber():
    """Each subscriber receives each published update."""
    first: list[ProgressUpdate] = []
    second: list[ProgressUpdate] = []
    hub = ProgressHub([first.append, second.append])

    hub.publish(update())

    assert first == [update()]
    assert second == [update()]


def test_hub_survives_failing_subscriber(caplog):
    """A raising subscriber is logged once and counted, and the others still receive."""
    def broken(_: ProgressUpdate) -> None:
        raise RuntimeError("artifact API down")

    received: list[ProgressUpdate] = []
    hub = ProgressHub([broken, received.append])

    with caplog.at_level(logging.WARNING, logger="ue_pilot.progress"):
        hub.publish(update())
        hub.publish(update())

    assert len(received) == 2
    assert list(hub.errors.values()) == [2]
    assert list(hub.errors)[0].endswith("broken")
    assert len([r for r in caplog.records if "artifact API down" in r.message]) == 1


def test_hub_subscribed_ends_with_block():
    """A subscriber of `subscribed` receives nothing after the block."""
    hub = ProgressHub()
    received: list[ProgressUpdate] = []

    with hub.subscribed(received.append):
        hub.publish(update())
    hub.publish(update())

    assert len(received) == 1


# The reporter


def test_reporter_publishes_start_at_once():
    """Creating a reporter publishes an update with its key and no percentage."""
    hub, received = recording_hub()

    ProgressReporter("export-progress-rewards", "export rewards", hub=hub)

    assert [(u.key, u.label, u.percent) for u in received] == [
        ("export-progress-rewards", "export rewards", None)
    ]


def test_reporter_throttles_to_interval():
    """Reports within one interval of the last published one are dropped."""
    hub, received = recording_hub()
    clock = FakeClock()
    reporter = ProgressReporter("k", "work", hub=hub, interval=1.0, clock=clock)

    for step in range(1000):
        clock.now += 0.0009
        reporter.report(step / 10, f"{step} rows")
    clock.now += 0.2
    reporter.report(99.0, "990 rows")

    assert [u.percent for u in received] == [None, 99.0]


def test_reporter_force_publishes():
    """A forced report goes out even within the interval."""
    hub, received = recording_hub()
    reporter = ProgressReporter("k", "work", hub=hub, clock=FakeClock())

    published = reporter.report(50.0, "half", force=True)

    assert published is True
    assert received[-1].percent == 50.0


def test_reporter_finish_reports_100():
    """Finishing publishes 100 % and finished at once, whatever the interval."""
    hub, received = recording_hub()
    reporter = ProgressReporter("k", "work", hub=hub, clock=FakeClock())

    reporter.finish("50 rows stored")

    assert received[-1].percent == 100.0
    assert received[-1].finished is True
    assert received[-1].failed is False


def test_reporter_failure_keeps_last_percent():
    """A failed finish keeps the last published percentage."""
    hub, received = recording_hub()
    clock = FakeClock()
    reporter = ProgressReporter("k", "work", hub=hub, clock=clock)
    clock.now += 5
    reporter.report(30.0, "30 rows")

    reporter.finish("failed: IncompleteExportError", failed=True)

    assert received[-1].percent == 30.0
    assert received[-1].failed is True


def test_reporter_silent_after_finish():
    """Reports and finishes after the first finish publish nothing."""
    hub, received = recording_hub()
    clock = FakeClock()
    reporter = ProgressReporter("k", "work", hub=hub, clock=clock)
    reporter.finish("done")
    clock.now += 5

    reporter.report(10.0, "late", force=True)
    reporter.finish("again")

    assert len(received) == 2


def test_reporter_clamps_percent():
    """Percentages outside 0 to 100 are clamped."""
    hub, received = recording_hub()
    reporter = ProgressReporter("k", "work", hub=hub, clock=FakeClock())

    reporter.report(140.0, "over", force=True)

    assert received[-1].percent == 100.0


@pytest.mark.parametrize("key", ["Export", "export_rewards", "export rewards", ""],
                         ids=["upper", "underscore", "space", "empty"])
def test_reporter_rejects_invalid_key(key):
    """A key Prefect would reject is rejected before anything is published."""
    hub, received = recording_hub()

    with pytest.raises(ValueError, match="invalid progress key"):
        ProgressReporter(key, "work", hub=hub)
    assert received == []


def test_artifact_key_makes_valid_key():
    """Org ids and export names become lowercase keys of letters, digits, dashes."""
    assert artifact_key("archive-blobs", "org_Flow01") == "archive-blobs-org-flow01"


def test_percent_of_unknown_total():
    """Without a total there is no percentage."""
    assert percent_of(10, None) is None
    assert percent_of(10, 0) is None
    assert percent_of(25, 100) == 25.0


@pytest.mark.parametrize(("count", "text"), [
    (950, "950 B"), (1_200, "1.2 kB"), (3_400_000, "3.4 MB"), (5e12, "5000.0 GB"),
], ids=["bytes", "kilobytes", "megabytes", "beyond-gigabytes"])
def test_format_bytes(count, text):
    """Byte counts use SI units up to GB."""
    assert format_bytes(count) == text


# The terminal line


def test_progress_line_draws_in_place():
    """The line starts with a carriage return, shows the bar and erases the rest."""
    stream = Terminal()
    line = ProgressLine(stream)

    line(update(percent=40.0))

    text = stream.getvalue()
    assert text.startswith("\r")
    assert text.endswith(ERASE_LINE)
    assert "export rewards [########------------]  40% 2.0 kB, 20 rows" in text


def test_progress_line_without_percent():
    """An unknown percentage shows the description without a bar."""
    stream = Terminal()
    line = ProgressLine(stream)

    line(update(percent=None))

    assert "export rewards 2.0 kB, 20 rows" in stream.getvalue()
    assert "#" not in stream.getvalue()


def test_progress_line_clears_when_all_finish():
    """When the last running work finishes, the line is erased."""
    stream = Terminal()
    line = ProgressLine(stream)
    line(update())

    line(update(finished=True))

    assert stream.getvalue().endswith("\r" + ERASE_LINE)


def test_progress_line_clears_before_log():
    """A log record written to the same stream starts on an erased line."""
    stream = Terminal()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("tests.progress.clear")
    log.addHandler(handler)
    log.propagate = False
    line = ProgressLine(stream)
    try:
        line(update())
        drawn = len(stream.getvalue())
        log.warning("export failed")
    finally:
        line.close()
        log.removeHandler(handler)

    after = stream.getvalue()[drawn:]
    assert after.startswith("\r" + ERASE_LINE + "export failed")
    assert handler.filters == []


def test_terminal_progress_off_without_terminal():
    """A stream that is not a terminal gets no line and no subscriber."""
    hub = ProgressHub()
    stream = io.StringIO()

    with terminal_progress(stream, hub=hub) as line:
        hub.publish(update())

    assert line is None
    assert stream.getvalue() == ""


def test_terminal_progress_off_when_disabled():
    """With enabled False (--json) a terminal gets no line either."""
    hub = ProgressHub()
    stream = Terminal()

    with terminal_progress(stream, enabled=False, hub=hub) as line:
        hub.publish(update())

    assert line is None
    assert stream.getvalue() == ""


def test_terminal_progress_on_terminal():
    """On a terminal the block's updates are drawn and the line erased at the end."""
    hub = ProgressHub()
    stream = Terminal()

    with terminal_progress(stream, hub=hub) as line:
        hub.publish(update())
    hub.publish(update(percent=80.0))

    assert line is not None
    assert "40%" in stream.getvalue()
    assert "80%" not in stream.getvalue()
    assert stream.getvalue().endswith("\r" + ERASE_LINE)


# The export flow and the CLI


@pytest.fixture(scope="module")
def sandbox():
    with SandboxProcess(orgs=2, storage=True) as running:
        yield running


@pytest.fixture
def env(ue_env, sandbox):
    ue_env(sandbox.env)
    return sandbox.env


def read_progress_artifacts(flow_run_id: str) -> dict[str, object]:
    """Return the newest progress artifact of each key of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
    )
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                type=ArtifactFilterType(any_=["progress"]),
            ),
            sort=ArtifactSort.CREATED_DESC,
        )
    newest: dict[str, object] = {}
    for artifact in artifacts:
        newest.setdefault(artifact.key, artifact)
    return newest


def test_export_progress_artifacts_end_at_100(prefect_server, env):
    """Each export of a run leaves a progress artifact at 100 % with its rows."""
    from flows.export_all import export_all

    manifest = export_all(ORG)
    artifacts = read_progress_artifacts(manifest["run_id"])

    assert sorted(artifacts) == ["export-progress-rewards", "export-progress-tax-cra"]
    assert artifacts["export-progress-rewards"].data == 100.0
    assert artifacts["export-progress-tax-cra"].data == 100.0
    assert "50 rows" in artifacts["export-progress-rewards"].description


def test_cli_export_prints_no_bar(prefect_server, env):
    """Under CliRunner standard error is not a terminal, so no bar is drawn."""
    from ue_pilot.cli import main

    result = CliRunner().invoke(main, ["export-all", "--org", ORG])

    assert result.exit_code == 0, result.output
    assert "Export complete" in result.stdout
    assert "\r" not in result.output
    assert ERASE_LINE not in result.output
    assert "export rewards" not in result.stderr
