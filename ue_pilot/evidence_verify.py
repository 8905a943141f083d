"""Verification of an org's chain of evidence records.

Reads every record of the org under `<org>/` and `archived/<org>/`, and its
head, then reports each sign of tampering with the record it concerns:

- edited: a record's bytes differ from the sha256 its successor (or the head)
  recorded for it, or it is not a readable record.
- deleted: a sequence number is missing, or the head names a missing record.
- reordered: a record stored under another record's name, a link that skips
  sequence numbers, or a record timed well before its predecessor.
- forked: two records with one sequence number.
- head: the head is missing or does not point at the last record.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from azure.storage.blob import ContainerClient

from ue_pilot.evidence_records import (
    ARCHIVE_PREFIX,
    FAMILIES,
    RECORD_FILE,
    EvidenceError,
    Head,
    head_name,
    read_blob,
    read_head,
    sha256_hex,
)

# Records written on different hosts can disagree on the time by this much
# before verification calls their order into question.
CLOCK_SKEW = timedelta(minutes=5)
READ_WORKERS = 8
REQUIRED_FIELDS = ("format", "org", "family", "name", "recorded", "previous_sha256",
                   "checks", "artifacts")


@dataclass
class StoredRecord:
    """One record blob as stored: its name, bytes, sha256 and parsed content."""

    blob: str
    data: bytes
    sha256: str
    content: dict | None

    @property
    def sequence(self) -> int | None:
        value = (self.content or {}).get("sequence")
        return value if isinstance(value, int) else None

    @property
    def relative_name(self) -> str:
        return self.blob.removeprefix(ARCHIVE_PREFIX)


@dataclass
class Problem:
    """A sign of tampering: its kind, the record it concerns and what was seen."""

    kind: str
    record: str
    detail: str

    def line(self) -> str:
        return f"{self.kind:<9} {self.record}: {self.detail}"


@dataclass
class ChainReport:
    """The outcome of verifying one org's chain."""

    org: str
    records: list[StoredRecord]
    head: Head | None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """intact, tampered, or empty when there is nothing to verify."""
        if self.problems:
            return "tampered"
        if not self.records:
            return "empty"
        return "intact"

    def chain(self) -> list[StoredRecord]:
        """Return the readable records in sequence order."""
        readable = [r for r in self.records if r.sequence is not None]
        return sorted(readable, key=lambda r: (r.sequence, r.blob))

    def to_dict(self) -> dict:
        last = self.chain()[-1] if self.chain() else None
        return {
            "org": self.org,
            "status": self.status,
            "records": len(self.records),
            "last_sequence": last.sequence if last else None,
            "last_sha256": last.sha256 if last else None,
            "problems": [vars(p) for p in self.problems],
            "notes": self.notes,
        }

    def lines(self) -> list[str]:
        """Render the report for a terminal: a verdict line, then each problem."""
        if self.status == "empty":
            return [f"Evidence of {self.org}: NOTHING TO VERIFY (no records found)"]
        count = f"{len(self.records)} record(s)"
        chain = self.chain()
        if chain:
            count += f", last sequence {chain[-1].sequence} sha256 {chain[-1].sha256}"
        lines = [f"Evidence of {self.org}: {self.status.upper()}", count]
        if self.problems:
            lines += ["", *[problem.line() for problem in self.problems]]
        if self.notes:
            lines += ["", *[f"note: {note}" for note in self.notes]]
        return lines


def record_pattern(org: str) -> re.Pattern[str]:
    families = "|".join(re.escape(family) for family in FAMILIES)
    return re.compile(
        rf"^(?:{re.escape(ARCHIVE_PREFIX)})?{re.escape(org)}/(?:{families})"
        rf"/\d{{4}}/\d{{2}}/[^/]+/{re.escape(RECORD_FILE)}$"
    )


def list_record_names(container: ContainerClient, org: str) -> list[str]:
    """List every record of the org under `<org>/` and `archived/<org>/`.

    The trailing slash keeps the records of an org whose id starts with this
    one out.
    """
    pattern = record_pattern(org)
    names = []
    for prefix in (f"{org}/", f"{ARCHIVE_PREFIX}{org}/"):
        for blob in container.list_blobs(name_starts_with=prefix):
            if pattern.match(blob.name):
                names.append(blob.name)
    return names


def load_record(container: ContainerClient, name: str) -> StoredRecord | None:
    stored = read_blob(container, name)
    if stored is None:
        return None
    try:
        content = json.loads(stored[0])
    except ValueError:
        content = None
    if not isinstance(content, dict):
        content = None
    return StoredRecord(name, stored[0], sha256_hex(stored[0]), content)


def load_records(container: ContainerClient, org: str) -> list[StoredRecord]:
    """Download every record of the org, a few at a time."""
    names = list_record_names(container, org)
    with ThreadPoolExecutor(max_workers=READ_WORKERS) as pool:
        loaded = list(pool.map(lambda name: load_record(container, name), names))
    return [record for record in loaded if record is not None]


def verify_chain(container: ContainerClient, org: str) -> ChainReport:
    """Read the org's records and head, and check every link between them."""
    records = load_records(container, org)
    try:
        head = read_head(container, org)
    except EvidenceError as error:
        report = ChainReport(org, records, None)
        report.problems = [Problem("edited", head_name(org), str(error))]
        return report
    report = ChainReport(org, records, head)
    report.problems = find_problems(org, records, head)
    if head is not None and head.pending:
        report.notes.append(
            f"the head has an unfinished write of {head.pending.get('record')}; "
            "the next record written completes or drops it"
        )
    return report


def find_problems(
    org: str, records: list[StoredRecord], head: Head | None
) -> list[Problem]:
    """Return every sign of tampering in the org's records and head."""
    problems = list(content_problems(org, records))
    readable = [r for r in records if r.sequence is not None]
    problems += fork_problems(readable)
    problems += link_problems(readable)
    problems += time_problems(readable)
    problems += head_problems(org, readable, records, head)
    return problems


def content_problems(org: str, records: list[StoredRecord]) -> Iterable[Problem]:
    """Flag records that are not readable, or that belong to another place."""
    for record in records:
        if record.content is None:
            yield Problem("edited", record.blob, "not a valid JSON object")
            continue
        if record.sequence is None:
            yield Problem("edited", record.blob, "has no integer sequence number")
            continue
        missing = [key for key in REQUIRED_FIELDS if key not in record.content]
        if missing:
            yield Problem("edited", record.blob, f"has no {', '.join(missing)}")
        written_as = record.content.get("name")
        if written_as != record.relative_name:
            yield Problem(
                "reordered",
                record.blob,
                f"contains the record written as {written_as} (sequence "
                f"{record.sequence}); the records were moved or swapped",
            )
        if record.content.get("org") != org:
            yield Problem("edited", record.blob,
                          f"names org {record.content.get('org')!r}, not {org!r}")


def fork_problems(readable: list[StoredRecord]) -> Iterable[Problem]:
    by_sequence: dict[int, list[StoredRecord]] = {}
    for record in readable:
        by_sequence.setdefault(record.sequence, []).append(record)
    for sequence, group in sorted(by_sequence.items()):
        if len(group) > 1:
            names = ", ".join(sorted(r.blob for r in group))
            yield Problem("forked", group[0].blob,
                          f"sequence {sequence} has {len(group)} records: {names}")


def link_problems(readable: list[StoredRecord]) -> Iterable[Problem]:
    """Check that each record links to the exact bytes of its predecessor."""
    by_sha = {record.sha256: record for record in readable}
    by_sequence: dict[int, list[StoredRecord]] = {}
    for record in readable:
        by_sequence.setdefault(record.sequence, []).append(record)
    for record in sorted(readable, key=lambda r: (r.sequence, r.blob)):
        previous = record.content.get("previous_sha256")
        if record.sequence <= 1:
            if previous is not None or record.sequence < 1:
                yield Problem("edited", record.blob,
                              f"sequence {record.sequence} with a predecessor "
                              f"sha256 {previous}; the chain starts at 1 with none")
            continue
        linked = by_sha.get(previous)
        if linked is not None:
            if linked.sequence != record.sequence - 1:
                yield Problem(
                    "reordered", record.blob,
                    f"sequence {record.sequence} links to {linked.blob}, which "
                    f"has sequence {linked.sequence}",
                )
            continue
        predecessors = by_sequence.get(record.sequence - 1, [])
        if predecessors:
            for predecessor in predecessors:
                yield Problem(
                    "edited", predecessor.blob,
                    f"its sha256 is {predecessor.sha256} but {record.blob} "
                    f"(sequence {record.sequence}) records {previous}",
                )
            continue
        lower = [s for s in by_sequence if s < record.sequence]
        first_missing = max(lower) + 1 if lower else 1
        yield Problem(
            "deleted", record.blob,
            f"{missing_range(first_missing, record.sequence - 1)} missing: this "
            f"record links to sha256 {previous}, which no stored record has",
        )


def missing_range(first: int, last: int) -> str:
    if first == last:
        return f"the record with sequence {first} is"
    return f"the records with sequence {first} to {last} are"


def time_problems(readable: list[StoredRecord]) -> Iterable[Problem]:
    """Flag a record recorded well before its predecessor."""
    ordered = sorted(readable, key=lambda r: (r.sequence, r.blob))
    for before, after in zip(ordered, ordered[1:]):
        first, second = recorded_at(before), recorded_at(after)
        if first is None or second is None:
            continue
        if second < first - CLOCK_SKEW:
            yield Problem(
                "reordered", after.blob,
                f"sequence {after.sequence} was recorded at {second.isoformat()}, "
                f"before sequence {before.sequence} at {first.isoformat()}",
            )


def recorded_at(record: StoredRecord) -> datetime | None:
    try:
        moment = datetime.fromisoformat(record.content["recorded"])
    except (KeyError, TypeError, ValueError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def head_problems(
    org: str,
    readable: list[StoredRecord],
    records: list[StoredRecord],
    head: Head | None,
) -> Iterable[Problem]:
    """Check that the head names the last record with its exact sha256."""
    if head is None:
        if records:
            yield Problem("head", head_name(org), "missing, but records exist")
        return
    location = head_name(head.org, head.archived)
    if head.record is None:
        if readable:
            yield Problem("head", location, "names no record, but records exist")
        return
    last = max((r.sequence for r in readable), default=None)
    named = [r for r in records if r.relative_name == head.record]
    if not named:
        yield Problem("deleted", head.record,
                      f"the head names it (sequence {head.sequence}) but it is missing")
        return
    if all(r.sha256 != head.sha256 for r in named):
        yield Problem("edited", named[0].blob,
                      f"its sha256 is {named[0].sha256} but the head records "
                      f"{head.sha256}")
    if last is None or last == head.sequence or pending_stored(head, readable):
        return
    yield Problem("head", location,
                  f"the head is at sequence {head.sequence} but the records go "
                  f"up to sequence {last}")


def pending_stored(head: Head, readable: list[StoredRecord]) -> bool:
    """Check that the only record past the head is the one its pending mark names.

    A writer between uploading a record and committing the head, or one that
    died there, leaves exactly this state.
    """
    pending = head.pending or {}
    beyond = [r for r in readable if r.sequence > head.sequence]
    return (
        len(beyond) == 1
        and beyond[0].sequence == pending.get("sequence")
        and beyond[0].relative_name == pending.get("record")
        and beyond[0].sha256 == pending.get("sha256")
    )
