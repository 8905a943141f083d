"""The timeline picture of an evidence report: check outcomes per run, as a PNG.

Drawn on matplotlib's Agg canvas without pyplot, so it needs no display and
keeps no figure state between calls.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

if TYPE_CHECKING:
    from ue_pilot.evidence_report import ReportRun

# Cell colours, in the order of their index in the drawn matrix.
STATUS_COLOURS = {
    "absent": "#e0e0e0",
    "pass": "#2e7d32",
    "inconclusive": "#f9a825",
    "fail": "#c62828",
}
STATUS_INDEX = {status: index for index, status in enumerate(STATUS_COLOURS)}
RUN_STATE_ROW = "run state"
RECORD_ROW = "evidence record"
MAX_TICK_LABELS = 12
DPI = 100


def run_state_status(run: ReportRun) -> str:
    """Return the colour key of the run's Prefect state."""
    if run.state_type is None:
        return "absent"
    if run.state_type == "COMPLETED":
        return "pass"
    if run.failed:
        return "fail"
    return "inconclusive"


def record_status(run: ReportRun) -> str:
    """Return pass with a record, fail when one was expected, else inconclusive."""
    if run.record is not None:
        return "pass"
    return "fail" if run.missing_record else "inconclusive"


def timeline_matrix(runs: Sequence[ReportRun]) -> tuple[list[str], list[list[int]]]:
    """Return the row labels and one row of colour indexes per label."""
    check_ids = sorted({check_id for run in runs if run.record
                        for check_id in run.record.statuses})
    rows = [[STATUS_INDEX[run_state_status(run)] for run in runs],
            [STATUS_INDEX[record_status(run)] for run in runs]]
    for check_id in check_ids:
        rows.append([
            STATUS_INDEX[run.record.statuses.get(check_id, "absent")
                         if run.record else "absent"]
            for run in runs
        ])
    return [RUN_STATE_ROW, RECORD_ROW, *check_ids], rows


def figure_size(columns: int, rows: int) -> tuple[float, float]:
    """Return width and height in inches: 0.07 in per run, 0.2 in per row, bounded."""
    width = min(max(4 + 0.07 * columns, 8), 22)
    height = min(max(2.2 + 0.2 * rows, 3.5), 30)
    return width, height


def draw_timeline(
    runs: Sequence[ReportRun], total: int, title: str, path: Path
) -> None:
    """Draw one column per run and one row per check id, and save it as PNG.

    `runs` are the runs to draw, oldest first. `total` is the number of runs in
    the report, which can be more than the caller drew.
    """
    labels, rows = timeline_matrix(runs)
    figure = Figure(figsize=figure_size(len(runs), len(labels)), dpi=DPI,
                    layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=9, loc="left")
    if runs:
        draw_cells(axes, rows, len(runs))
        label_axes(axes, labels, runs)
    else:
        axes.text(0.5, 0.5, f"No run in the period ({total} runs)",
                  ha="center", va="center")
        axes.set_axis_off()
    figure.legend(
        handles=[Patch(color=colour, label=status)
                 for status, colour in STATUS_COLOURS.items()],
        loc="outside lower center", ncol=len(STATUS_COLOURS), frameon=False,
        fontsize=8,
    )
    figure.savefig(path, format="png")


def draw_cells(axes, rows: list[list[int]], columns: int) -> None:
    colours = ListedColormap(list(STATUS_COLOURS.values()))
    # Thin white borders separate cells until they would hide narrow columns.
    border = 0.3 if columns <= 120 else 0
    axes.pcolormesh(rows, cmap=colours, vmin=-0.5, vmax=len(STATUS_COLOURS) - 0.5,
                    edgecolors="white", linewidth=border)
    axes.axhline(2, color="#424242", linewidth=0.8)
    axes.invert_yaxis()


def label_axes(axes, labels: list[str], runs: Sequence[ReportRun]) -> None:
    axes.set_yticks([index + 0.5 for index in range(len(labels))], labels,
                    fontsize=7)
    step = max(1, -(-len(runs) // MAX_TICK_LABELS))
    ticks = list(range(0, len(runs), step))
    axes.set_xticks(
        [index + 0.5 for index in ticks],
        [f"{runs[i].started:%m-%d %H:%M}" if runs[i].started else "?" for i in ticks],
        fontsize=7, rotation=45, ha="right",
    )
    axes.set_xlabel("run start (UTC), oldest first", fontsize=8)
    axes.tick_params(length=0)
