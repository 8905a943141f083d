"""Progress of long work (exports, the archive) for the Prefect UI and the CLI.

Tasks report through a `ProgressReporter`, which publishes to a `ProgressHub`
at most once per interval (unless forced), plus the first and the final
update. The hub
passes each update to its subscribers in the reporting thread:

- `ArtifactSink`, subscribed to the module's `HUB`, keeps one Prefect
  progress artifact per key and run, updated in place.
- `ProgressLine` draws the running work as one line on a terminal. The CLI
  subscribes it while a flow runs in its process (`terminal_progress`).

This module imports Prefect only when an update reaches the artifact sink, so
the CLI can import it before it configures Prefect.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TextIO
from uuid import UUID

__all__ = [
    "HUB",
    "ArtifactSink",
    "ProgressHub",
    "ProgressLine",
    "ProgressReporter",
    "ProgressUpdate",
    "artifact_key",
    "format_bytes",
    "percent_of",
    "terminal_progress",
]

logger = logging.getLogger(__name__)

# Prefect accepts artifact keys of lowercase letters, digits and dashes only.
ARTIFACT_KEY = re.compile(r"^[a-z0-9-]+$")
DEFAULT_INTERVAL_SECONDS = 1.0
BAR_WIDTH = 20
# Erase from the cursor to the end of the line (ANSI "EL").
ERASE_LINE = "\x1b[K"


@dataclass(frozen=True)
class ProgressUpdate:
    """One report of a piece of long work."""

    key: str
    label: str
    # 0 to 100, or None while the total is not known.
    percent: float | None
    description: str
    finished: bool = False
    failed: bool = False

    def render(self) -> str:
        """Return the label, a bar when the percentage is known, and the description."""
        if self.percent is None:
            return f"{self.label} {self.description}"
        filled = round(BAR_WIDTH * self.percent / 100)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        return f"{self.label} [{bar}] {self.percent:3.0f}% {self.description}"


Subscriber = Callable[[ProgressUpdate], None]


class ProgressHub:
    """Passes each published update to every subscriber, in the publishing thread.

    A subscriber that raises does not stop the reporting work. Its error is
    logged at its first occurrence per subscriber and counted in `errors`.
    """

    def __init__(self, subscribers: list[Subscriber] | None = None) -> None:
        self._subscribers: list[Subscriber] = list(subscribers or [])
        self._lock = threading.Lock()
        self.errors: dict[str, int] = {}

    def subscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

    @contextmanager
    def subscribed(self, subscriber: Subscriber) -> Iterator[Subscriber]:
        """Subscribe `subscriber` for the duration of the block."""
        self.subscribe(subscriber)
        try:
            yield subscriber
        finally:
            self.unsubscribe(subscriber)

    def publish(self, update: ProgressUpdate) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            try:
                subscriber(update)
            except Exception as error:  # noqa: BLE001 - progress never fails work
                self._count_error(subscriber, update, error)

    def _count_error(
        self, subscriber: Subscriber, update: ProgressUpdate, error: Exception
    ) -> None:
        name = getattr(subscriber, "__qualname__", None) or type(subscriber).__name__
        with self._lock:
            self.errors[name] = self.errors.get(name, 0) + 1
            first = self.errors[name] == 1
        if first:
            logger.warning(
                "progress subscriber %s failed on %s: %s: %s (later failures "
                "are only counted)",
                name, update.key, type(error).__name__, str(error)[:200],
            )


class ProgressReporter:
    """Reports one piece of work to a hub, at most once per `interval` seconds.

    The first update (no percentage yet) goes out on creation, and the update
    of `finish` always goes out. A `report` in between is dropped unless
    `interval` seconds have passed since the last published update or it is
    forced.
    """

    def __init__(
        self,
        key: str,
        label: str,
        description: str = "starting",
        *,
        hub: ProgressHub | None = None,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ARTIFACT_KEY.match(key):
            raise ValueError(
                f"invalid progress key {key!r}: use lowercase letters, digits and "
                "dashes (build it with artifact_key)"
            )
        self.hub = hub if hub is not None else HUB
        self.interval = interval
        self.clock = clock
        self.last = ProgressUpdate(key, label, None, description)
        self.last_published = clock()
        self.published = 0
        self.hub.publish(self.last)
        self.published += 1

    @property
    def finished(self) -> bool:
        return self.last.finished

    def report(
        self, percent: float | None, description: str, force: bool = False
    ) -> bool:
        """Publish the progress if the interval has passed. Return True if it did."""
        if self.finished:
            return False
        now = self.clock()
        if not force and now - self.last_published < self.interval:
            return False
        self._publish(replace(self.last, percent=clamp(percent),
                              description=description), now)
        return True

    def finish(
        self, description: str, *, percent: float | None = None, failed: bool = False
    ) -> None:
        """Publish the final update: 100 % when done, else `percent` or the last one."""
        if self.finished:
            return
        if percent is None:
            percent = self.last.percent if failed else 100.0
        update = replace(self.last, percent=clamp(percent), description=description,
                         finished=True, failed=failed)
        self._publish(update, self.clock())

    def _publish(self, update: ProgressUpdate, now: float) -> None:
        self.last = update
        self.last_published = now
        self.published += 1
        self.hub.publish(update)


def clamp(percent: float | None) -> float | None:
    if percent is None:
        return None
    return round(min(100.0, max(0.0, percent)), 1)


def percent_of(done: float, total: float | None) -> float | None:
    """Return `done` as a percentage of `total`, or None when there is no total."""
    if not total:
        return None
    return 100.0 * done / total


def artifact_key(*parts: str) -> str:
    """Join `parts` with dashes into a valid artifact key.

    Letters are lowercased, and every character other than a-z, 0-9 and a dash
    becomes a dash.
    """
    text = "-".join(parts).lower()
    return re.sub(r"[^a-z0-9-]", "-", text)


def format_bytes(count: float) -> str:
    """Format a byte count with SI units: 950 B, 1.2 kB, 3.4 MB."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


class ArtifactSink:
    """Keeps one Prefect progress artifact per key and run, updated in place.

    The artifact belongs to the task run (or else the flow run) that reports,
    because Prefect reads the run from the reporting thread's context.
    Updates from outside any run are ignored. An unknown percentage is shown
    as 0 % until the work finishes.
    """

    def __init__(self) -> None:
        self._ids: dict[tuple[UUID, str], UUID] = {}
        self._lock = threading.Lock()

    def __call__(self, update: ProgressUpdate) -> None:
        run_id = current_run_id()
        if run_id is None:
            return
        from prefect.artifacts import (
            create_progress_artifact,
            update_progress_artifact,
        )

        slot = (run_id, update.key)
        with self._lock:
            artifact_id = self._ids.get(slot)
        percent = update.percent if update.percent is not None else 0.0
        description = f"{update.label}: {update.description}"
        if artifact_id is None:
            artifact_id = create_progress_artifact(
                progress=percent, key=update.key, description=description
            )
        else:
            update_progress_artifact(artifact_id, progress=percent,
                                     description=description)
        with self._lock:
            if update.finished:
                self._ids.pop(slot, None)
            else:
                self._ids[slot] = artifact_id


def current_run_id() -> UUID | None:
    """Return the id of the task run, else the flow run, of this thread's context."""
    from prefect.context import FlowRunContext, TaskRunContext

    task_context = TaskRunContext.get()
    if task_context is not None:
        return task_context.task_run.id
    flow_context = FlowRunContext.get()
    if flow_context is not None and flow_context.flow_run is not None:
        return flow_context.flow_run.id
    return None


HUB = ProgressHub([ArtifactSink()])


class ProgressLine:
    """Draws the running work as one line on a terminal, rewritten in place.

    Log handlers that write to the same stream erase the line before each
    record, and the next update draws it again.

    NOTE: a record logged while another thread redraws the line can still
    start after the bar on the same line.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._active: dict[str, ProgressUpdate] = {}
        self._lock = threading.RLock()
        self._drawn = False
        self._filter = ClearLineBeforeLog(self)
        self._handlers: set[logging.Handler] = set()

    def __call__(self, update: ProgressUpdate) -> None:
        with self._lock:
            if update.finished:
                self._active.pop(update.key, None)
            else:
                self._active[update.key] = update
            self._attach_to_log_handlers()
            self._draw()

    def _draw(self) -> None:
        text = " | ".join(update.render() for update in self._active.values())
        if not text:
            self.clear()
            return
        width = max(20, shutil.get_terminal_size().columns - 1)
        self.stream.write("\r" + text[:width] + ERASE_LINE)
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        """Erase the line if a bar is drawn on it."""
        with self._lock:
            if self._drawn:
                self.stream.write("\r" + ERASE_LINE)
                self.stream.flush()
                self._drawn = False

    def close(self) -> None:
        """Erase the line and stop clearing it before log records."""
        with self._lock:
            self.clear()
            self._active.clear()
            for handler in self._handlers:
                handler.removeFilter(self._filter)
            self._handlers.clear()

    def _attach_to_log_handlers(self) -> None:
        # Prefect configures its console handler when the first run starts,
        # so the handlers are looked up again at each draw.
        for handler in stream_handlers(self.stream):
            if handler not in self._handlers:
                handler.addFilter(self._filter)
                self._handlers.add(handler)


class ClearLineBeforeLog(logging.Filter):
    """Handler filter that erases the progress line before a record is written."""

    def __init__(self, line: ProgressLine) -> None:
        super().__init__()
        self.line = line

    def filter(self, record: logging.LogRecord) -> bool:
        self.line.clear()
        return True


def stream_handlers(stream: TextIO) -> list[logging.Handler]:
    """Return the logging handlers, on any logger, that write to `stream`."""
    loggers = [logging.getLogger()] + [
        item for item in list(logging.root.manager.loggerDict.values())
        if isinstance(item, logging.Logger)
    ]
    return [
        handler
        for item in loggers
        for handler in item.handlers
        if isinstance(handler, logging.StreamHandler)
        and getattr(handler, "stream", None) is stream
    ]


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def terminal_progress(
    stream: TextIO, enabled: bool = True, hub: ProgressHub | None = None
) -> Iterator[ProgressLine | None]:
    """Draw a progress line on `stream` during the block, if enabled and a terminal.

    Yields the line, or None when nothing is drawn: when `enabled` is False
    (for example with --json) or `stream` is not a terminal.
    """
    if not enabled or not is_terminal(stream):
        yield None
        return
    line = ProgressLine(stream)
    with (hub if hub is not None else HUB).subscribed(line):
        try:
            yield line
        finally:
            line.close()
