"""Blob Storage archive of one org: the rollback step "Archive blob storage artifacts".

Every blob under `<org>/` in the evidence container moves to `archived/<org>/`
with the same relative name. Blob Storage has no rename, so each blob is
copied, the copy is verified, and only then is the source deleted. One run:

1. Check the org id: valid, not reserved, known, and not a shorter prefix of
   another org's id. Nothing is changed before this passes.
2. List `<org>/` with metadata and tags, one request per 5,000 blobs.
3. Write the archive manifest (name, size, MD5, metadata and tags of every
   blob) before the first copy, or reuse the open one of a killed run.
4. Move the sources in chunks of 256 in name order. First copy each source
   of the chunk whose archived copy is missing or stale. Each copy is
   conditioned on the listed source etag and on no existing destination.
   Then verify the copies from the next pages of one running listing of
   `archived/<org>/`: copy status, size, MD5, metadata and tags equal to the
   source's listing. A copy that no such page shows is read on its own.
   Last, read the next pages of a running listing of `<org>/`, and delete
   the verified sources that still have the copied etag and tags, in Blob
   Batch requests of up to 256 deletes, each conditioned on that etag. Tags
   need the listing because setting them leaves the etag as it was. A chunk
   is verified only after the next chunk's copies exist, so the running
   listing has names beyond it and does not end early.
5. List `<org>/` and `archived/<org>/` again, check every manifest entry
   against the new listing, and close the manifest.

Chunks keep the storage account's blob count near its starting count: at
most two chunks of copies exist beside their sources at any time.

A run killed at any point resumes from what the storage shows: a verified
copy is not copied again, a missing or stale one is copied again, and a
source already deleted is checked against the manifest. Per blob, a run sends
about one request (the copy) plus its share of listings and batches.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.blob import BlobProperties, ContainerClient, ContentSettings
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError

from tasks.blob_storage import StorageUnavailableError, open_container
from ue_pilot.orgids import InvalidOrgIdError, validate_org_id
from ue_pilot.progress import ProgressReporter, artifact_key
from ue_pilot.settings import Settings

ARCHIVE_ROOT = "archived"
MANIFEST_FOLDER = f"{ARCHIVE_ROOT}/_manifests"
# Top-level folder names of the container that are not orgs. An org id equal
# to one of them would archive other orgs' archives or collide with manifests.
RESERVED_NAMES = frozenset({ARCHIVE_ROOT, "_manifests", "quarantine"})
# Blob Batch accepts at most 256 sub-requests per batch.
MAX_BATCH_SIZE = 256
# Sources moved per chunk: copied, verified and deleted before later chunks
# are verified. Also the page size of the verification listing.
CHUNK_SIZE = 256
# List Blobs returns at most 5,000 blobs per page.
MAX_PAGE_SIZE = 5000
COPY_WORKERS = 8
# Seconds to wait for a copy that the service reports as pending. Azure may
# finish a copy in the background after Copy Blob returns, but Azurite 3.37
# finishes every same-account copy before it responds.
COPY_TIMEOUT_SECONDS = 600.0
COPY_POLL_SECONDS = (0.5, 1.0, 2.0, 5.0)
# Blob names listed in a summary or an error, per kind of problem.
MAX_NAMES_SHOWN = 20
PROGRESS_INTERVAL_SECONDS = 2.0
MANIFEST_STATE_KEY = "archivestate"


class ArchiveError(RuntimeError):
    """The archive could not finish, and a re-run resumes it."""


class ArchiveCopyError(ArchiveError):
    """A copy failed, so the run stopped before deleting any source."""


class ArchiveIncompleteError(ArchiveError):
    """Some blobs are still under `<org>/` after the run, as `summary` lists."""

    def __init__(self, message: str, summary: dict) -> None:
        super().__init__(message)
        self.summary = summary

    def __reduce__(self):
        # Prefect may pickle a task's exception, and the default reduction
        # would drop `summary`, which __init__ requires.
        return (type(self), (str(self), self.summary))


class UnknownOrgError(InvalidOrgIdError):
    """A valid org id that names no pilot org and no folder in the container."""


@dataclass(frozen=True)
class BlobRecord:
    """One blob as a listing shows it, with `md5` in base64 ("" when unset)."""

    name: str
    size: int
    md5: str
    metadata: dict[str, str]
    tags: dict[str, str]
    etag: str
    last_modified: datetime | None = None
    copy_status: str | None = None
    md5_computed: bool = False

    @classmethod
    def from_properties(cls, properties: BlobProperties) -> BlobRecord:
        md5 = properties.content_settings.content_md5
        return cls(
            name=properties.name,
            size=properties.size,
            md5=base64.b64encode(md5).decode() if md5 else "",
            metadata=dict(properties.metadata or {}),
            tags=dict(properties.tags or {}),
            etag=properties.etag,
            last_modified=properties.last_modified,
            copy_status=properties.copy.status if properties.copy else None,
        )

    def content(self) -> tuple:
        """Return what a verified copy must share with its source."""
        return (self.size, self.md5, self.metadata, self.tags)

    def to_entry(self, relative_name: str) -> dict:
        return {
            "name": relative_name,
            "size": self.size,
            "md5": self.md5,
            "md5_computed": self.md5_computed,
            "metadata": self.metadata,
            "tags": self.tags,
            "etag": self.etag,
        }


@dataclass
class Manifest:
    """The record of what was under `<org>/` when the archive began."""

    blob: str
    sha256: str
    # The service's time of the upload. An archived blob older than this
    # comes from an earlier archive, so this archive never overwrites it.
    created: datetime
    entries: dict[str, dict]
    state: str = "open"

    def entry_content(self, relative_name: str) -> tuple:
        entry = self.entries[relative_name]
        return (entry["size"], entry["md5"], entry["metadata"], entry["tags"])


@dataclass
class ArchiveSummary:
    """Counts and names of one archive run, JSON-able through `to_dict`."""

    org: str
    container: str
    source_prefix: str
    archive_prefix: str
    manifest: Manifest | None = None
    listed: int = 0
    copied: int = 0
    already_archived: int = 0
    deleted: int = 0
    left_under_source: int = 0
    archived_blobs: int = 0
    manifest_archived: int = 0
    md5_downloads: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def add_problem(self, kind: str, name: str) -> None:
        self.problems.setdefault(kind, []).append(name)

    @property
    def matches_manifest(self) -> bool:
        """True when every manifest entry is archived with its listed content."""
        if self.manifest is None:
            return False
        return self.manifest_archived == len(self.manifest.entries)

    @property
    def complete(self) -> bool:
        """True when nothing is left under `<org>/` and nothing needs attention."""
        blocking = set(self.problems) - {"changed_since_manifest", "not_in_manifest"}
        return self.left_under_source == 0 and not blocking

    def to_dict(self) -> dict:
        manifest = None
        if self.manifest is not None:
            manifest = {
                "blob": self.manifest.blob,
                "sha256": self.manifest.sha256,
                "blobs": len(self.manifest.entries),
                "bytes": sum(e["size"] for e in self.manifest.entries.values()),
                "state": self.manifest.state,
            }
        return {
            "org": self.org,
            "container": self.container,
            "source_prefix": self.source_prefix,
            "archive_prefix": self.archive_prefix,
            "manifest": manifest,
            "complete": self.complete,
            "matches_manifest": self.matches_manifest,
            "listed": self.listed,
            "copied": self.copied,
            "already_archived": self.already_archived,
            "deleted": self.deleted,
            "left_under_source": self.left_under_source,
            "archived_blobs": self.archived_blobs,
            "manifest_archived": self.manifest_archived,
            "md5_downloads": self.md5_downloads,
            "problems": {
                kind: {"count": len(names), "names": names[:MAX_NAMES_SHOWN]}
                for kind, names in sorted(self.problems.items())
            },
            "seconds": round(self.seconds, 3),
        }


# Org id check


def check_org(
    container: ContainerClient,
    org_id: object,
    pattern: str,
    known_org_ids: list[str],
) -> str:
    """Return `org_id` when it names exactly one org, else raise InvalidOrgIdError.

    A valid id is accepted when UE_PILOT_ORG_IDS lists it, or when blobs exist
    under `<org>/` or `archived/<org>/`. An unknown id that starts another
    known org's id is rejected with that org named. The check only lists
    folder names, so it changes nothing.
    """
    org = validate_org_id(org_id, pattern)
    if org in RESERVED_NAMES:
        raise InvalidOrgIdError(
            f"invalid org id {org!r}: it is a reserved folder name of the "
            f"container ({', '.join(sorted(RESERVED_NAMES))}); pass an org id"
        )
    folders = list_folder_names(container, "") | list_folder_names(
        container, f"{ARCHIVE_ROOT}/"
    )
    if org in known_org_ids or org in folders:
        return org
    longer = sorted(
        name for name in set(known_org_ids) | folders if name.startswith(org)
    )
    if longer:
        raise UnknownOrgError(
            f"invalid org id {org!r}: it is not a known org but a prefix of "
            f"{', '.join(longer[:5])}; pass one exact org id"
        )
    raise UnknownOrgError(
        f"unknown org id {org!r}: UE_PILOT_ORG_IDS does not list it and container "
        f"{container.container_name!r} has no blobs under {org + '/'!r} or "
        f"{f'{ARCHIVE_ROOT}/{org}/'!r}; check the id"
    )


def list_folder_names(container: ContainerClient, prefix: str) -> set[str]:
    """Return the names of the virtual folders directly under `prefix`."""
    names = set()
    for item in container.walk_blobs(name_starts_with=prefix or None, delimiter="/"):
        if item.name.endswith("/"):
            names.add(item.name[len(prefix) : -1])
    return names


# Listings and MD5


def list_records(container: ContainerClient, prefix: str) -> dict[str, BlobRecord]:
    """List every blob under `prefix` with metadata, tags and copy status.

    NOTE: the whole listing stays in memory. A record of a blob with two
    metadata entries and two tags takes about 850 bytes (tracemalloc, 10,000
    records), so an org with a million blobs needs about 1 GB.
    """
    listing = container.list_blobs(
        name_starts_with=prefix, include=["metadata", "tags", "copy"]
    )
    return {item.name: BlobRecord.from_properties(item) for item in listing}


def compute_md5(container: ContainerClient, record: BlobRecord) -> BlobRecord:
    """Download a blob that has no Content-MD5 and return it with the MD5 computed.

    The download is conditioned on the listed etag, so the MD5 belongs to
    exactly the listed version.
    """
    digest = hashlib.md5()
    stream = container.download_blob(
        record.name, etag=record.etag, match_condition=MatchConditions.IfNotModified
    )
    for chunk in stream.chunks():
        digest.update(chunk)
    md5 = base64.b64encode(digest.digest()).decode()
    return replace(record, md5=md5, md5_computed=True)


def fill_missing_md5(
    container: ContainerClient,
    records: dict[str, BlobRecord],
    known: dict[tuple[str, str], str],
    summary: ArchiveSummary,
) -> dict[str, BlobRecord]:
    """Compute the MD5 of every record without one, reusing `known[(name, etag)]`."""
    filled = dict(records)
    for name, record in records.items():
        if record.md5:
            continue
        md5 = known.get((name, record.etag))
        if md5:
            filled[name] = replace(record, md5=md5, md5_computed=True)
            continue
        try:
            filled[name] = compute_md5(container, record)
        except (ResourceModifiedError, ResourceNotFoundError):
            # The blob changed or was deleted since the listing. This run
            # neither copies nor deletes it, and a re-run lists it anew.
            del filled[name]
            summary.add_problem("changed_while_hashed", name)
            continue
        known[(name, record.etag)] = filled[name].md5
        summary.md5_downloads += 1
    return filled


# Manifest


def manifest_prefix(org: str) -> str:
    return f"{MANIFEST_FOLDER}/{org}/"


def find_manifest(container: ContainerClient, org: str) -> tuple[Manifest | None, bool]:
    """Load the org's open manifest, else its newest one, and whether it is open.

    A killed or failed run leaves its manifest open. Raises ArchiveError when
    more than one is open, which happens only when two archives of the org
    ran at the same time.
    """
    listing = container.list_blobs(
        name_starts_with=manifest_prefix(org), include=["metadata"]
    )
    states = {
        item.name: (item.metadata or {}).get(MANIFEST_STATE_KEY, "open")
        for item in listing
    }
    open_names = sorted(name for name, state in states.items() if state == "open")
    if len(open_names) > 1:
        raise ArchiveError(
            f"{len(open_names)} open archive manifests for {org}: {open_names}. "
            "Another archive of this org may be running. Wait for it, then set "
            f"metadata {MANIFEST_STATE_KEY}=complete on the older one"
        )
    if open_names:
        return load_manifest(container, open_names[0]), True
    if states:
        return load_manifest(container, max(states)), False
    return None, False


def load_manifest(container: ContainerClient, name: str) -> Manifest:
    blob = container.get_blob_client(name)
    properties = blob.get_blob_properties()
    data = blob.download_blob(
        etag=properties.etag, match_condition=MatchConditions.IfNotModified
    ).readall()
    sha256 = hashlib.sha256(data).hexdigest()
    stored = (properties.metadata or {}).get("sha256")
    if stored and stored != sha256:
        raise ArchiveError(
            f"archive manifest {name} was changed after it was written: its "
            f"sha256 is {sha256}, its metadata says {stored}. Find out who "
            "changed it and restore it from the storage account's versions or "
            "backups before any archive of this org runs again"
        )
    document = json.loads(data)
    return Manifest(
        blob=name,
        sha256=sha256,
        created=properties.creation_time,
        entries={entry["name"]: entry for entry in document["entries"]},
        state=(properties.metadata or {}).get(MANIFEST_STATE_KEY, "open"),
    )


def write_manifest(
    container: ContainerClient,
    org: str,
    sources: dict[str, BlobRecord],
    source_prefix: str,
) -> Manifest:
    """Upload a new open manifest of `sources`, never replacing an existing blob.

    `Manifest.created` is the service's Last-Modified time of the upload, on
    the clock that stamps the destination blobs too.
    """
    started = datetime.now(UTC)
    name = f"{manifest_prefix(org)}{started:%Y%m%dT%H%M%S%fZ}.json"
    entries = [
        record.to_entry(record.name[len(source_prefix) :])
        for record in sources.values()
    ]
    document = {
        "org": org,
        "container": container.container_name,
        "source_prefix": source_prefix,
        "archive_prefix": f"{ARCHIVE_ROOT}/{source_prefix}",
        "started": started.isoformat(),
        "blobs": len(entries),
        "bytes": sum(entry["size"] for entry in entries),
        "entries": entries,
    }
    data = json.dumps(document, indent=1, sort_keys=True).encode()
    sha256 = hashlib.sha256(data).hexdigest()
    response = container.get_blob_client(name).upload_blob(
        data,
        overwrite=False,
        metadata={MANIFEST_STATE_KEY: "open", "sha256": sha256},
        content_settings=ContentSettings(
            content_type="application/json",
            content_md5=bytearray(hashlib.md5(data).digest()),
        ),
    )
    return Manifest(
        blob=name,
        sha256=sha256,
        created=response["last_modified"],
        entries={entry["name"]: entry for entry in entries},
    )


def close_manifest(container: ContainerClient, manifest: Manifest) -> None:
    """Mark the manifest complete in its metadata, so its content and sha256 stay."""
    blob = container.get_blob_client(manifest.blob)
    blob.set_blob_metadata(
        {MANIFEST_STATE_KEY: "complete", "sha256": manifest.sha256}
    )
    manifest.state = "complete"


# Progress and logging


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Return the Prefect run logger, or this module's logger outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


class ArchiveProgress(ProgressReporter):
    """Progress of one archive, published at most every PROGRESS_INTERVAL_SECONDS.

    The hub of `ue_pilot.progress` keeps it in the progress artifact
    `archive-blobs-<org>` and shows it on the CLI's progress line.
    """

    @classmethod
    def start(cls, org: str) -> ArchiveProgress | None:
        """Start reporting inside a flow or task run, or return None outside one."""
        if TaskRunContext.get() is None and FlowRunContext.get() is None:
            return None
        return cls(
            artifact_key("archive-blobs", org),
            f"archive {org}",
            f"Archive of {org}/ to {ARCHIVE_ROOT}/{org}/: starting",
            interval=PROGRESS_INTERVAL_SECONDS,
        )


class MoveProgress:
    """Counts of one archive's copies and deletes, published to its progress artifact.

    Copies and deletes weigh the same: the bar is at 100 % when every planned
    copy is made and every listed source is deleted.
    """

    def __init__(
        self, reporter: ArchiveProgress | None, copies: int, sources: int
    ) -> None:
        self.reporter = reporter
        self.copies = copies
        self.sources = sources
        self.copied = 0
        self.deleted = 0
        self._lock = threading.Lock()

    def copy_done(self) -> None:
        with self._lock:
            self.copied += 1
        self.publish()

    def deletes_done(self, count: int) -> None:
        with self._lock:
            self.deleted += count
        self.publish()

    @property
    def percent(self) -> float:
        total = self.copies + self.sources
        return 100.0 * (self.copied + self.deleted) / total if total else 100.0

    def publish(self) -> None:
        if self.reporter is None:
            return
        self.reporter.report(
            self.percent,
            f"copied {self.copied} of {self.copies}, deleted {self.deleted} of "
            f"{self.sources} blobs",
        )


# Copy


@dataclass(frozen=True)
class CopyJob:
    """One source to copy, with `destination_etag` set to replace a stale copy."""

    source: BlobRecord
    destination: str
    destination_etag: str | None = None


def is_verified_copy(source: BlobRecord, destination: BlobRecord) -> bool:
    """Check that a destination is a finished copy with the source's content."""
    finished = destination.copy_status in (None, "success")
    return finished and destination.content() == source.content()


def plan_copies(
    sources: dict[str, BlobRecord],
    destinations: dict[str, BlobRecord],
    manifest: Manifest,
    summary: ArchiveSummary,
) -> list[CopyJob]:
    """Return the copies still needed, counting verified ones and flagging conflicts.

    A destination that differs from its source is copied over when this
    archive wrote it (see written_by_this_archive). Any other comes from an
    earlier archive and is reported as a conflict, never overwritten.
    """
    jobs = []
    for name, source in sources.items():
        relative = name[len(summary.source_prefix) :]
        if relative not in manifest.entries:
            summary.add_problem("not_in_manifest", name)
        target = summary.archive_prefix + relative
        destination = destinations.get(target)
        if destination is None:
            jobs.append(CopyJob(source, target))
        elif is_verified_copy(source, destination):
            summary.already_archived += 1
        elif written_by_this_archive(destination, manifest, relative):
            jobs.append(CopyJob(source, target, destination.etag))
        else:
            summary.add_problem("conflict", target)
    return jobs


def written_by_this_archive(
    destination: BlobRecord, manifest: Manifest, relative: str
) -> bool:
    """Decide whether an archived blob that differs from its source is this archive's.

    Last-Modified has whole seconds. A blob from a second after the
    manifest's is this archive's copy. One from the manifest's own second is
    this archive's only when its copy did not finish or it has the content
    the manifest recorded for its source, so an earlier archive's copy is
    never taken for a stale one.
    """
    if destination.last_modified > manifest.created:
        return True
    if destination.last_modified < manifest.created:
        return False
    if destination.copy_status in ("pending", "failed", "aborted"):
        return True
    return (
        relative in manifest.entries
        and destination.content() == manifest.entry_content(relative)
    )


def copy_blob(container: ContainerClient, job: CopyJob) -> bool:
    """Copy one source to its destination, or return False when a condition failed.

    The copy takes the source only at its listed etag, and the destination
    only when it is missing (or still at the stale copy's etag). The service
    copies metadata and content properties. Tags are sent from the listing,
    because an asynchronous Copy Blob does not copy them.
    """
    if job.destination_etag is None:
        condition = {"match_condition": MatchConditions.IfMissing}
    else:
        condition = {
            "etag": job.destination_etag,
            "match_condition": MatchConditions.IfNotModified,
        }
    destination = container.get_blob_client(job.destination)
    try:
        response = destination.start_copy_from_url(
            container.get_blob_client(job.source.name).url,
            tags=job.source.tags or None,
            source_etag=job.source.etag,
            source_match_condition=MatchConditions.IfNotModified,
            **condition,
        )
    except HttpResponseError as error:
        # A 412 means the source or the destination changed since the listing,
        # and a 409 that the destination appeared meanwhile. Verification
        # decides about both.
        if error.status_code in (409, 412):
            return False
        raise
    if response["copy_status"] != "success":
        wait_for_copy(destination, response["copy_id"])
    return True


def wait_for_copy(destination, copy_id: str) -> None:
    """Poll a pending copy until it succeeds, or raise ArchiveCopyError."""
    deadline = time.monotonic() + COPY_TIMEOUT_SECONDS
    for attempt in itertools.count():
        delay = COPY_POLL_SECONDS[min(attempt, len(COPY_POLL_SECONDS) - 1)]
        time.sleep(delay)
        copy = destination.get_blob_properties().copy
        if copy.id != copy_id:
            raise ArchiveCopyError(
                f"copy to {destination.blob_name} was replaced by another copy "
                f"({copy.id}) while it ran"
            )
        if copy.status == "success":
            return
        if copy.status in ("failed", "aborted"):
            raise ArchiveCopyError(
                f"copy to {destination.blob_name} {copy.status}: "
                f"{copy.status_description}"
            )
        if time.monotonic() > deadline:
            raise ArchiveCopyError(
                f"copy to {destination.blob_name} timed out: still {copy.status} "
                f"after {COPY_TIMEOUT_SECONDS:.0f} s"
            )


def copy_all(
    container: ContainerClient,
    jobs: list[CopyJob],
    summary: ArchiveSummary,
    progress: MoveProgress | None,
    workers: int,
) -> None:
    """Run the copies on `workers` threads, and stop and raise at the first failure.

    A failed copy raises ArchiveCopyError before the sources of its chunk
    and of the chunk before it are deleted, so a storage fault never leaves
    a run deleting while copies fail.
    """
    stop = threading.Event()
    failures: list[str] = []

    def run(job: CopyJob) -> bool | None:
        if stop.is_set():
            return None
        try:
            return copy_blob(container, job)
        except (AzureError, ArchiveCopyError) as error:
            stop.set()
            failures.append(f"{job.source.name}: {describe_error(error)}")
            return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run, job) for job in jobs]
        for job, future in zip(jobs, futures):
            copied = future.result()
            if copied:
                summary.copied += 1
            elif copied is False:
                summary.add_problem("changed_during_copy", job.source.name)
            if progress is not None:
                progress.copy_done()
    if failures:
        raise copy_failure(summary, failures)


def copy_failure(summary: ArchiveSummary, failures: list[str]) -> ArchiveCopyError:
    """Return the error of failed copies, saying which sources were deleted."""
    if summary.deleted:
        deleted = (
            f"Only the {summary.deleted} sources whose copies were verified "
            "were deleted"
        )
    else:
        deleted = "No source was deleted"
    error = ArchiveCopyError(
        f"archive of {summary.org} stopped: {len(failures)} cop"
        f"{'y' if len(failures) == 1 else 'ies'} to {summary.archive_prefix} "
        f"failed, first {failures[0]}. {deleted}; fix the storage problem "
        "and run the archive again, which resumes"
    )
    return error


def describe_error(error: Exception) -> str:
    """Return the error's type, status and first line, short enough for a log."""
    label = type(error).__name__
    details = (getattr(error, "status_code", None), getattr(error, "error_code", None))
    for detail in details:
        if detail:
            label += f" {detail}"
    first_line = (str(error).splitlines() or [""])[0][:200]
    return f"{label}: {first_line}"


# Verify and delete


def select_verified(
    sources: dict[str, BlobRecord],
    destinations: dict[str, BlobRecord],
    summary: ArchiveSummary,
) -> list[BlobRecord]:
    """Return the sources whose destination listing matches them exactly."""
    flagged = set(summary.problems.get("conflict", []))
    flagged.update(summary.problems.get("changed_during_copy", []))
    verified = []
    for name, source in sources.items():
        target = summary.archive_prefix + name[len(summary.source_prefix) :]
        destination = destinations.get(target)
        if destination is not None and is_verified_copy(source, destination):
            verified.append(source)
        elif name not in flagged and target not in flagged:
            summary.add_problem("unverified", name)
    return verified


def delete_sources(
    container: ContainerClient,
    records: list[BlobRecord],
    summary: ArchiveSummary,
    progress: MoveProgress | None,
    batch_size: int,
) -> None:
    """Delete verified sources in Blob Batch requests, each at its listed etag.

    A 412 means the source changed after it was listed: it is kept, and a
    re-run copies the new version. A 404 means it is already gone.
    """
    batch_size = min(batch_size, MAX_BATCH_SIZE)
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        entries = [
            {
                "name": record.name,
                "etag": record.etag,
                "match_condition": MatchConditions.IfNotModified,
            }
            for record in batch
        ]
        responses = container.delete_blobs(*entries, raise_on_any_failure=False)
        for record, response in zip(batch, responses, strict=True):
            if response.status_code in (202, 404):
                summary.deleted += 1
            elif response.status_code == 412:
                summary.add_problem("changed_after_copy", record.name)
            else:
                summary.add_problem(
                    "delete_failed", f"{record.name} ({response.status_code})"
                )
        if progress is not None:
            progress.deletes_done(len(batch))


def check_manifest(
    manifest: Manifest,
    destinations: dict[str, BlobRecord],
    left: set[str],
    summary: ArchiveSummary,
) -> int:
    """Return how many manifest entries are archived with their listed content.

    An entry whose source is gone and whose archived copy is missing is
    reported as missing. One archived with other content changed after the
    manifest was written.
    """
    archived = 0
    for relative in manifest.entries:
        destination = destinations.get(summary.archive_prefix + relative)
        listed = manifest.entry_content(relative)
        if destination is not None and destination.content() == listed:
            archived += 1
        elif summary.source_prefix + relative in left:
            continue
        elif destination is not None:
            summary.add_problem("changed_since_manifest", destination.name)
        else:
            summary.add_problem("missing", summary.archive_prefix + relative)
    return archived


# Chunks


def read_record(container: ContainerClient, name: str) -> BlobRecord | None:
    """Return one blob's record from its properties and tags, or None when missing.

    Two requests, so the archive uses it only for a copy that no listing
    showed after the copy was made.
    """
    blob = container.get_blob_client(name)
    try:
        properties = blob.get_blob_properties()
        tags = blob.get_blob_tags() if properties.tag_count else {}
    except ResourceNotFoundError:
        return None
    return replace(BlobRecord.from_properties(properties), name=name, tags=tags)


class ListingCursor:
    """One listing of a prefix, read a page at a time as the move needs it.

    Each page continues after the last name of the page before, and shows
    the blobs as they are when the page is requested.
    """

    def __init__(self, container: ContainerClient, prefix: str, page_size: int):
        self._pages = container.list_blobs(
            name_starts_with=prefix,
            include=["metadata", "tags", "copy"],
            results_per_page=min(page_size, MAX_PAGE_SIZE),
        ).by_page()
        self.last_name: str | None = None
        self.ended = False

    def records_through(self, last_name: str) -> Iterator[BlobRecord]:
        """Yield records of further pages until one reaches `last_name` or the end."""
        while not self.ended and (self.last_name is None or self.last_name < last_name):
            yield from self.next_page()

    def next_page(self) -> list[BlobRecord]:
        """Return the next page's records, and set `ended` after the last page."""
        try:
            page = next(self._pages)
        except StopIteration:
            self.ended = True
            return []
        records = [BlobRecord.from_properties(item) for item in page]
        if records:
            self.last_name = records[-1].name
        if self._pages.continuation_token is None:
            self.ended = True
        return records


@dataclass
class ChunkedMove:
    """The copies, verification and deletes of one archive, chunk by chunk.

    Chunk i is verified after the copies of chunk i+1 are made: the running
    listing then always has names beyond chunk i, so it does not end before
    the last chunk. A listed destination whose copy belongs to a later chunk
    was listed before that copy, so it is set aside and the copy is checked
    on its own after it is made.
    """

    container: ContainerClient
    summary: ArchiveSummary
    sources: dict[str, BlobRecord]
    destinations: dict[str, BlobRecord]
    jobs: list[CopyJob]
    computed_md5: dict[tuple[str, str], str]
    progress: MoveProgress | None
    workers: int
    batch_size: int
    chunk_size: int
    chunks: list[list[str]] = field(init=False)
    copied_through: int = field(init=False, default=-1)

    def __post_init__(self) -> None:
        names = sorted(self.sources)
        size = max(1, self.chunk_size)
        self.chunks = [names[i : i + size] for i in range(0, len(names), size)]
        self.jobs_by_source = {job.source.name: job for job in self.jobs}
        self.chunk_of_target = {
            self.jobs_by_source[name].destination: index
            for index, chunk in enumerate(self.chunks)
            for name in chunk
            if name in self.jobs_by_source
        }
        self.listed_after_copy: set[str] = set()
        self.cursor = ListingCursor(
            self.container, self.summary.archive_prefix, self.chunk_size
        )
        # Sources by name, from a second running listing read just before
        # each chunk's deletes.
        self.source_cursor = ListingCursor(
            self.container, self.summary.source_prefix, self.chunk_size
        )
        self.current_sources: dict[str, BlobRecord] = {}

    def target(self, source_name: str) -> str:
        relative = source_name[len(self.summary.source_prefix) :]
        return self.summary.archive_prefix + relative

    def run(self) -> None:
        """Copy, verify and delete every chunk; raise ArchiveCopyError on a failed copy.

        Deletes do not overlap copies. In Azurite 3.37 that overlap made the
        archive slower: 4,000 blobs took 35 to 38 s with deletes on a second
        thread against 32 to 34 s without.
        """
        for index, chunk in enumerate(self.chunks):
            jobs = [self.jobs_by_source[n] for n in chunk if n in self.jobs_by_source]
            copy_all(self.container, jobs, self.summary, self.progress, self.workers)
            self.copied_through = index
            if index > 0:
                self.settle(index - 1)
        if self.chunks:
            self.settle(len(self.chunks) - 1)

    def settle(self, index: int) -> None:
        """Verify chunk `index` from the listing, then delete the verified sources."""
        chunk = self.chunks[index]
        self.read_listing_through(self.target(chunk[-1]))
        records = {}
        for name in chunk:
            target = self.target(name)
            # Every copy is checked in a listing made after its copy, or on
            # its own: a record from the first listing may be out of date.
            if target not in self.listed_after_copy:
                record = read_record(self.container, target)
                if record is None:
                    self.destinations.pop(target, None)
                    continue
                self.destinations[target] = record
            if target in self.destinations:
                records[target] = self.destinations[target]
        self.destinations.update(
            fill_missing_md5(self.container, records, self.computed_md5, self.summary)
        )
        verified = select_verified(
            {name: self.sources[name] for name in chunk},
            self.destinations,
            self.summary,
        )
        delete_sources(
            self.container,
            self.unchanged_sources(chunk, verified),
            self.summary,
            self.progress,
            self.batch_size,
        )

    def unchanged_sources(
        self, chunk: list[str], verified: list[BlobRecord]
    ) -> list[BlobRecord]:
        """Return the verified sources that a fresh listing shows unchanged.

        Setting tags does not change a blob's etag, so the etag condition of
        the delete would not notice new tags. A source whose etag or tags
        differ from the copied ones is kept, and a re-run copies it again. A
        source that is gone needs no delete.

        A copy deleted by another writer between its verification and this
        delete is not seen here, but the run's final check reports it missing.
        """
        for record in self.source_cursor.records_through(chunk[-1]):
            self.current_sources[record.name] = record
        unchanged = []
        for source in verified:
            current = self.current_sources.pop(source.name, None)
            if current is None:
                current = read_record(self.container, source.name)
            if current is None:
                continue
            if current.etag != source.etag or current.tags != source.tags:
                self.summary.add_problem("changed_after_copy", source.name)
                continue
            unchanged.append(source)
        return unchanged

    def read_listing_through(self, last_target: str) -> None:
        """Read archive listing pages until one reaches `last_target` or the end."""
        for record in self.cursor.records_through(last_target):
            pending = self.chunk_of_target.get(record.name)
            if pending is not None and pending > self.copied_through:
                continue
            self.destinations[record.name] = record
            self.listed_after_copy.add(record.name)


# The archive run


def archive_org(
    container: ContainerClient,
    org_id: str,
    *,
    pattern: str,
    known_org_ids: list[str],
    workers: int = COPY_WORKERS,
    batch_size: int = MAX_BATCH_SIZE,
    chunk_size: int = CHUNK_SIZE,
) -> ArchiveSummary:
    """Move every blob under `<org>/` to `archived/<org>/` and return the summary.

    Raises InvalidOrgIdError before any change when `org_id` is not exactly
    one org, ArchiveCopyError when a copy fails (only sources whose copies
    were verified are deleted then), StorageUnavailableError when Blob
    Storage fails, and ArchiveIncompleteError when blobs are left under
    `<org>/`. A re-run resumes in each case.
    """
    started = time.monotonic()
    logger = run_logger()
    org = checked_org(container, org_id, pattern, known_org_ids)
    summary = ArchiveSummary(
        org=org,
        container=container.container_name,
        source_prefix=f"{org}/",
        archive_prefix=f"{ARCHIVE_ROOT}/{org}/",
    )
    progress = ArchiveProgress.start(org)
    try:
        return move_org(container, summary, logger, progress, workers, batch_size,
                        chunk_size, started)
    except AzureError as error:
        if progress is not None:
            progress.finish("stopped: Blob Storage failed", failed=True)
        raise StorageUnavailableError(
            f"Blob Storage failed during the archive of {org} (container "
            f"{container.container_name!r}): {describe_error(error)}. No source "
            "whose copy was not verified was deleted; when the storage answers "
            "again, run the archive again, which resumes"
        ) from None


def move_org(
    container: ContainerClient,
    summary: ArchiveSummary,
    logger: logging.Logger | logging.LoggerAdapter,
    progress: ArchiveProgress | None,
    workers: int,
    batch_size: int,
    chunk_size: int,
    started: float,
) -> ArchiveSummary:
    """List, copy, verify, delete and check: the archive after its org check."""
    org = summary.org
    computed_md5: dict[tuple[str, str], str] = {}

    # List
    manifest, is_open = find_manifest(container, org)
    if manifest is not None:
        computed_md5.update(manifest_md5s(manifest, summary.source_prefix))
    sources = list_records(container, summary.source_prefix)
    sources = fill_missing_md5(container, sources, computed_md5, summary)
    summary.listed = len(sources)
    if sources and not is_open:
        manifest = write_manifest(container, org, sources, summary.source_prefix)
    log_manifest(logger, summary, manifest, is_open)
    summary.manifest = manifest

    # Copy, verify and delete, chunk by chunk
    destinations = list_records(container, summary.archive_prefix)
    destinations = fill_missing_md5(container, destinations, computed_md5, summary)
    jobs = plan_copies(sources, destinations, manifest, summary) if sources else []
    move = ChunkedMove(
        container=container,
        summary=summary,
        sources=sources,
        destinations=destinations,
        jobs=jobs,
        computed_md5=computed_md5,
        progress=MoveProgress(progress, len(jobs), len(sources)),
        workers=workers,
        batch_size=batch_size,
        chunk_size=chunk_size,
    )
    move.run()
    logger.info(
        "archive %s: %d copied, %d already archived, %d of %d sources deleted",
        org, summary.copied, summary.already_archived, summary.deleted,
        len(sources),
    )

    # Check, from listings made after the last delete
    left = set(container.list_blob_names(name_starts_with=summary.source_prefix))
    forget_gone_sources(summary, left)
    destinations = list_records(container, summary.archive_prefix)
    destinations = fill_missing_md5(container, destinations, computed_md5, summary)
    summary.left_under_source = len(left)
    summary.archived_blobs = len(destinations)
    if manifest is not None:
        summary.manifest_archived = check_manifest(
            manifest, destinations, left, summary
        )
    summary.seconds = time.monotonic() - started
    return finish(container, summary, logger, progress)


def forget_gone_sources(summary: ArchiveSummary, left: set[str]) -> None:
    """Drop "changed_after_copy" for sources that are gone after the run.

    A conditional delete of a blob that another run deleted first fails with
    412 in Azurite 3.37, as if the source had changed. Its copy was verified,
    so nothing is left to do for it.

    NOTE: only Azurite was tried. Azure may return 404 instead, which
    delete_sources already counts as deleted.
    """
    still_there = [name for name in summary.problems.get("changed_after_copy", [])
                   if name in left]
    if still_there:
        summary.problems["changed_after_copy"] = still_there
    else:
        summary.problems.pop("changed_after_copy", None)


def log_manifest(
    logger: logging.Logger | logging.LoggerAdapter,
    summary: ArchiveSummary,
    manifest: Manifest | None,
    was_open: bool,
) -> None:
    """Log whether this run wrote its manifest, resumes one, or only checks one."""
    if manifest is None:
        logger.info("archive %s: no blobs and no manifest", summary.org)
    elif was_open:
        logger.info(
            "archive %s: %d blobs under %s, resuming with manifest %s",
            summary.org, summary.listed, summary.source_prefix, manifest.blob,
        )
    elif summary.listed:
        logger.info(
            "archive %s: %d blobs under %s, manifest %s written",
            summary.org, summary.listed, summary.source_prefix, manifest.blob,
        )
    else:
        logger.info(
            "archive %s: no blobs under %s, checking manifest %s",
            summary.org, summary.source_prefix, manifest.blob,
        )


def checked_org(
    container: ContainerClient, org_id: str, pattern: str, known_org_ids: list[str]
) -> str:
    """Run check_org, turning a missing or unreachable container into clear errors."""
    try:
        return check_org(container, org_id, pattern, known_org_ids)
    except ResourceNotFoundError:
        raise ArchiveError(
            f"container {container.container_name!r} not found: check "
            "UE_BLOB_CONTAINER"
        ) from None
    except AzureError as error:
        raise StorageUnavailableError(
            f"Blob Storage unavailable (container {container.container_name!r}): "
            f"{describe_error(error)}"
        ) from None


def manifest_md5s(manifest: Manifest, source_prefix: str) -> dict[tuple[str, str], str]:
    """Return the MD5s the manifest computed by download, keyed by (name, etag)."""
    return {
        (source_prefix + entry["name"], entry["etag"]): entry["md5"]
        for entry in manifest.entries.values()
        if entry.get("md5_computed")
    }


def finish(
    container: ContainerClient,
    summary: ArchiveSummary,
    logger: logging.Logger | logging.LoggerAdapter,
    progress: ArchiveProgress | None,
) -> ArchiveSummary:
    """Close the manifest of a complete archive, or raise for an incomplete one."""
    for kind, names in sorted(summary.problems.items()):
        logger.warning(
            "archive %s: %d %s, first %s",
            summary.org, len(names), kind, names[:MAX_NAMES_SHOWN],
        )
    if not summary.complete:
        if progress is not None:
            progress.finish(
                f"incomplete: {summary.left_under_source} blobs left under "
                f"{summary.source_prefix}",
                failed=True,
            )
        problems = ", ".join(
            f"{len(names)} {kind}" for kind, names in sorted(summary.problems.items())
        )
        raise ArchiveIncompleteError(
            f"archive of {summary.org} incomplete: {summary.left_under_source} "
            f"blob(s) left under {summary.source_prefix} ({problems or 'no problem'}"
            "). Run the archive again to resume. A conflict is an archived blob "
            "from an earlier archive that differs from its source, and a missing "
            "blob is neither archived nor under its source: both need a person. "
            "A delete that fails again on the next run may be blocked by a lease "
            "or snapshots on the source: break the lease or delete the snapshots "
            "first",
            summary.to_dict(),
        )
    if summary.manifest is not None and summary.manifest.state == "open":
        close_manifest(container, summary.manifest)
    if progress is not None:
        progress.finish(
            f"done: {summary.archived_blobs} blobs under {summary.archive_prefix}"
        )
    logger.info(
        "archive %s complete: %d blobs under %s, manifest %s (%s), matches "
        "manifest: %s",
        summary.org,
        summary.archived_blobs,
        summary.archive_prefix,
        summary.manifest.blob if summary.manifest else "none",
        summary.manifest.sha256 if summary.manifest else "-",
        summary.matches_manifest,
    )
    return summary


def _retry_unless_rejected(task_object, task_run, state) -> bool:
    """Retry a failed archive unless the org id was rejected."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable state is retried
        return True
    return not isinstance(error, InvalidOrgIdError)


@task(
    name="archive-blobs",
    retries=1,
    retry_delay_seconds=[15],
    retry_condition_fn=_retry_unless_rejected,
    cache_policy=NO_CACHE,
)
def archive_blobs(settings: Settings, org_id: str) -> dict:
    """Move the org's blobs to `archived/<org>/` in UE_BLOB_CONTAINER.

    Returns the JSON-able summary: counts, the manifest's blob name and
    sha256, `complete` and `matches_manifest`. One task run handles every
    blob. Inside a flow it keeps a progress artifact up to date.
    """
    container = open_container(settings, create=False)
    summary = archive_org(
        container,
        org_id,
        pattern=settings.org_id_pattern,
        known_org_ids=settings.pilot_org_ids,
    )
    return summary.to_dict()
