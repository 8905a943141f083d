"""JSON documents the rollback keeps in Blob Storage: the pilot status document
and each org's rollback record.

The pilot status document (`UE_PILOT_STATUS_BLOB`, default `pilot-status.json`)
contains each org's current status and a history that only grows. The rollback
record (`rollback/<org>/state.json`) lists the steps a rollback has finished,
so a new run after a failed or killed one continues where it stopped.

Both are read, changed and written back with the read etag as an If-Match
condition, or If-None-Match: * for a new document. Two writers therefore never
lose each other's change: the later one gets 412 (or 409) and applies its
change again to the fresh document.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from azure.core import MatchConditions
from azure.core.exceptions import (
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.blob import ContainerClient, ContentSettings
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.blob_storage import open_container
from ue_pilot.settings import Settings

STATUS_ROLLED_BACK = "rolled-back"
ROLLBACK_IN_PROGRESS = "in-progress"
ROLLBACK_COMPLETED = "completed"
ROLLBACK_FOLDER = "rollback"
MAX_WRITE_ATTEMPTS = 8


class DocumentError(RuntimeError):
    """A status document is malformed, or kept changing under every write."""


@dataclass
class StoredDocument:
    """A JSON document as stored: None with no etag when the blob does not exist."""

    document: dict | None
    etag: str | None
    last_modified: datetime | None

    def version(self) -> dict:
        """Return the etag and modification time that identify this version."""
        modified = self.last_modified.isoformat() if self.last_modified else None
        return {"etag": self.etag, "last_modified": modified}


def read_document(container: ContainerClient, name: str) -> StoredDocument:
    """Download a JSON document with the etag of the version read."""
    try:
        downloader = container.get_blob_client(name).download_blob()
    except ResourceNotFoundError:
        return StoredDocument(None, None, None)
    data = downloader.readall()
    try:
        document = json.loads(data)
    except json.JSONDecodeError as error:
        raise DocumentError(f"blob {name!r} is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise DocumentError(f"blob {name!r} is not a JSON object")
    properties = downloader.properties
    return StoredDocument(document, properties.etag, properties.last_modified)


def update_document(
    container: ContainerClient,
    name: str,
    change: Callable[[dict | None], dict | None],
) -> StoredDocument:
    """Apply `change` to the stored document and write the result conditionally.

    `change` gets a copy of the document (None when there is none) and returns
    the new document, or None to leave the stored one as it is. It may run
    more than once, so it must only compute.
    """
    for attempt in range(MAX_WRITE_ATTEMPTS):
        stored = read_document(container, name)
        updated = change(copy.deepcopy(stored.document))
        if updated is None:
            return stored
        try:
            response = write_document(container, name, updated, stored.etag)
        except (ResourceModifiedError, ResourceExistsError):
            # Another writer got in between; back off a little and redo.
            time.sleep(random.uniform(0, min(0.1 * 2**attempt, 2.0)))
            continue
        return StoredDocument(updated, response["etag"], response["last_modified"])
    raise DocumentError(
        f"blob {name!r} changed under each of {MAX_WRITE_ATTEMPTS} writes; "
        "another process keeps writing it, so try again when it has finished"
    )


def write_document(
    container: ContainerClient, name: str, document: dict, etag: str | None
) -> dict:
    """Upload `document` only over version `etag`, or only as a new blob."""
    data = json.dumps(document, indent=2, sort_keys=True).encode()
    if etag is None:
        conditions: dict = {"overwrite": False}
    else:
        conditions = {
            "overwrite": True,
            "etag": etag,
            "match_condition": MatchConditions.IfNotModified,
        }
    return container.get_blob_client(name).upload_blob(
        data,
        content_settings=ContentSettings(
            content_type="application/json",
            content_md5=bytearray(hashlib.md5(data).digest()),
        ),
        **conditions,
    )


# The pilot status document


def check_status_document(document: dict | None, name: str) -> dict:
    """Return the document with its `orgs` and `history`, creating them if new."""
    document = document or {}
    document.setdefault("orgs", {})
    document.setdefault("history", [])
    if not isinstance(document["orgs"], dict) or not isinstance(
        document["history"], list
    ):
        raise DocumentError(
            f"pilot status document {name!r} is malformed: expected "
            '{"orgs": {...}, "history": [...]}; fix or move it, then run again'
        )
    return document


def read_pilot_status(settings: Settings, org: str) -> dict | None:
    """Return the org's current entry in the pilot status document, if any."""
    container = open_container(settings, create=False)
    stored = read_document(container, settings.pilot_status_blob)
    document = check_status_document(stored.document, settings.pilot_status_blob)
    return document["orgs"].get(org)


@task(
    name="update-pilot-status",
    retries=2,
    retry_delay_seconds=[5, 20],
    cache_policy=NO_CACHE,
)
def update_pilot_status(settings: Settings, entry: dict) -> dict:
    """Append `entry` to the pilot status document and make it the org's status.

    `entry` has org, status, time, run_id, rollback_id, approver and reason.
    An entry of the same org, rollback and status already in the history is
    not added again, so a retried or repeated step changes nothing.
    """
    name = settings.pilot_status_blob
    container = open_container(settings, create=False)
    added = False

    def change(document: dict | None) -> dict | None:
        nonlocal added
        document = check_status_document(document, name)
        for earlier in document["history"]:
            if all(earlier.get(key) == entry[key]
                   for key in ("org", "rollback_id", "status")):
                added = False
                return None
        added = True
        document["history"].append(entry)
        document["orgs"][entry["org"]] = entry
        document["updated"] = entry["time"]
        return document

    stored = update_document(container, name, change)
    get_run_logger().info(
        "org %s: pilot status document %s %s (etag %s)",
        entry["org"], name, "updated" if added else "already had this entry",
        stored.etag,
    )
    return {
        "blob": name,
        "added": added,
        "history_entries": len(stored.document["history"]),
        **stored.version(),
    }


# The rollback record


def record_name(org: str) -> str:
    return f"{ROLLBACK_FOLDER}/{org}/state.json"


def read_rollback_record(settings: Settings, org: str) -> dict | None:
    """Return the org's rollback record, None before its first rollback."""
    container = open_container(settings, create=False)
    return read_document(container, record_name(org)).document


@task(
    name="open-rollback-record",
    retries=2,
    retry_delay_seconds=[5, 20],
    cache_policy=NO_CACHE,
)
def open_rollback_record(settings: Settings, org: str, run: dict) -> dict:
    """Continue the org's rollback in progress, or start one, and add this run.

    `run` has run_id, reason, requested_by and the approval (approver,
    comment, approved_at). A new rollback takes this run's id as its rollback
    id and keeps a summary of the earlier one in `previous`.
    """
    container = open_container(settings, create=True)

    def change(record: dict | None) -> dict:
        if record is None or record.get("state") != ROLLBACK_IN_PROGRESS:
            record = new_record(org, run, record)
        if all(earlier["run_id"] != run["run_id"] for earlier in record["runs"]):
            record["runs"].append(run)
        return record

    return update_document(container, record_name(org), change).document


def new_record(org: str, run: dict, earlier: dict | None) -> dict:
    previous = list((earlier or {}).get("previous", []))
    if earlier is not None:
        previous.append({
            key: earlier.get(key)
            for key in ("rollback_id", "state", "started", "finished")
        })
    return {
        "org": org,
        "rollback_id": run["run_id"],
        "state": ROLLBACK_IN_PROGRESS,
        "started": run["approved_at"],
        "finished": None,
        "reason": run["reason"],
        "requested_by": run["requested_by"],
        "runs": [],
        "steps": {},
        "previous": previous,
    }


@task(
    name="save-rollback-step",
    retries=2,
    retry_delay_seconds=[5, 20],
    cache_policy=NO_CACHE,
)
def save_rollback_step(
    settings: Settings, org: str, rollback_id: str, step: str, outcome: dict
) -> dict:
    """Record that `step` finished with `outcome`; return the record."""
    container = open_container(settings, create=False)

    def change(record: dict | None) -> dict:
        check_same_rollback(record, org, rollback_id)
        record["steps"][step] = {
            **outcome, "finished": datetime.now(UTC).isoformat()
        }
        return record

    return update_document(container, record_name(org), change).document


@task(
    name="close-rollback-record",
    retries=2,
    retry_delay_seconds=[5, 20],
    cache_policy=NO_CACHE,
)
def close_rollback_record(settings: Settings, org: str, rollback_id: str) -> dict:
    """Mark the rollback completed; return the record."""
    container = open_container(settings, create=False)

    def change(record: dict | None) -> dict | None:
        check_same_rollback(record, org, rollback_id)
        if record["state"] == ROLLBACK_COMPLETED:
            return None
        record["state"] = ROLLBACK_COMPLETED
        record["finished"] = datetime.now(UTC).isoformat()
        return record

    return update_document(container, record_name(org), change).document


def check_same_rollback(record: dict | None, org: str, rollback_id: str) -> None:
    if record is None or record.get("rollback_id") != rollback_id:
        found = (record or {}).get("rollback_id")
        raise DocumentError(
            f"rollback record {record_name(org)!r} belongs to rollback {found!r}, "
            f"not {rollback_id!r}: another rollback run of {org} replaced it; "
            "check the other run and start a new one"
        )
