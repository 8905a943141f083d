"""Evidence records: one JSON record per org and flow run in Blob Storage, chained
by sha256 so that an edited, deleted or reordered record shows.

Layout in the evidence container:

- `<org>/<family>/<yyyy>/<mm>/<run-id>/record.json`: what one flow run checked
  for one org. Each record carries a sequence number and the sha256 of the
  org's previous record's exact bytes, so the records of an org form one chain
  across every family.
- `<org>/evidence-head.json`: the head of the chain, which names the last
  record with its sequence number and sha256. Appending reads the head instead
  of listing the org's history, and replaces it with an ETag condition, so two
  runs cannot both append the same sequence number.

The rollback flow moves `<org>/` to `archived/<org>/` with the same relative
names. Verification reads both places, and a record written after the move
continues the archived chain.

Appending is a two-step commit on the head. The writer first marks the head
with the record it is about to write (`pending`), then uploads the record, then
commits the head. A writer that dies in between leaves a pending mark, which
the next writer completes when the record is there with the announced sha256,
or drops when it is not.

This module does not log and does not import Prefect; `tasks/evidence.py` and
the CLI call it.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from azure.core import MatchConditions
from azure.core.exceptions import (
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.blob import ContainerClient, ContentSettings

from ue_pilot.checks import CheckResult, Status, verdict
from ue_pilot.redact import redact_text

FAMILIES = ("isolation-audit", "onboarding", "export", "rollback")
TRIGGERS = ("schedule", "operator", "automation", "cli")
RECORD_FILE = "record.json"
HEAD_FILE = "evidence-head.json"
ARCHIVE_PREFIX = "archived/"
RECORD_FORMAT = "ue-pilot.evidence-record/1"
HEAD_FORMAT = "ue-pilot.evidence-head/1"

# A pending mark older than this belongs to a writer that died: the claim,
# upload and commit of one record take a few requests, well under a second.
PENDING_TIMEOUT = timedelta(minutes=10)
MAX_APPEND_ATTEMPTS = 12


class EvidenceError(RuntimeError):
    """The evidence chain of an org cannot be read or appended to."""


class ChainConflictError(EvidenceError):
    """Other writers kept the head busy for every append attempt."""


class InvalidFamilyError(ValueError):
    """A record family that is not one of FAMILIES."""


def validate_family(family: object) -> str:
    """Return `family` if it is a known record family, else raise InvalidFamilyError."""
    if family not in FAMILIES:
        raise InvalidFamilyError(
            f"invalid evidence family {family!r}: expected one of {', '.join(FAMILIES)}"
        )
    return family


# Record contents.


def canonical_bytes(document: dict) -> bytes:
    """Serialize `document` as the stored bytes: sorted keys, ASCII, 2-space indent."""
    text = json.dumps(document, sort_keys=True, indent=2, ensure_ascii=True)
    return (text + "\n").encode("ascii")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_name(org: str, family: str, run_id: str, when: datetime) -> str:
    """Return `<org>/<family>/<yyyy>/<mm>/<run-id>/record.json`."""
    validate_family(family)
    return f"{org}/{family}/{when:%Y}/{when:%m}/{run_id}/{RECORD_FILE}"


def head_name(org: str, archived: bool = False) -> str:
    return f"{ARCHIVE_PREFIX if archived else ''}{org}/{HEAD_FILE}"


def redact_values(value: object, secrets: list[str]) -> object:
    """Return `value` with every secret masked in every string, keys included."""
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, dict):
        return {
            redact_text(str(key), secrets): redact_values(item, secrets)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_values(item, secrets) for item in value]
    return value


def check_entry(check: CheckResult | dict) -> dict:
    """Return one check as the record stores it: id, org, status, summary, observed."""
    data = check.to_dict() if isinstance(check, CheckResult) else dict(check)
    missing = [key for key in ("id", "status") if key not in data]
    if missing:
        raise ValueError(f"check {data!r:.200} has no {' or '.join(missing)}")
    status = Status(data["status"]).value
    return {
        "id": str(data["id"]),
        "org": data.get("org"),
        "status": status,
        "summary": str(data.get("summary", "")),
        "observed": json.loads(json.dumps(data.get("observed") or {}, default=str)),
    }


def record_verdict(checks: list[dict]) -> str:
    """Return the verdict of a record's checks, inconclusive when it has none."""
    results = [CheckResult(c["id"], Status(c["status"])) for c in checks]
    return verdict(results).value


def public_settings(view: dict[str, object]) -> dict[str, object]:
    """Return a settings view fit for one org's record.

    The pilot org list is replaced by its length, so one org's evidence does not
    name the other pilot unions.
    """
    data = dict(view)
    orgs = data.pop("pilot_org_ids", None)
    if orgs is not None:
        data["pilot_org_count"] = len(orgs)
    return data


def build_body(
    *,
    org: str,
    family: str,
    name: str,
    run: dict,
    trigger: dict,
    target: dict,
    settings_view: dict,
    checks: list[CheckResult | dict],
    artifacts: list[dict],
    secrets: list[str],
) -> dict:
    """Build a record without its chain fields, with every secret masked.

    `append_record` adds `sequence`, `previous_record`, `previous_sha256` and
    `recorded` once it has read the head.
    """
    entries = [check_entry(check) for check in checks]
    body = {
        "format": RECORD_FORMAT,
        "org": org,
        "family": validate_family(family),
        "name": name,
        "run": run,
        "trigger": trigger,
        "target": target,
        "settings": public_settings(settings_view),
        "verdict": record_verdict(entries),
        "checks": entries,
        "artifacts": sorted(artifacts, key=lambda a: (a["name"], a["blob"])),
    }
    return redact_values(body, secrets)


def classify_trigger(
    deployment_id: str | None, auto_scheduled: bool, created_by_type: str | None
) -> str:
    """Return what started a flow run: schedule, automation, operator or cli.

    A run outside any deployment was called in process, as `ue-pilot audit`
    does. A deployment run that its schedule did not create was started by an
    operator (the UI, `prefect deployment run`) or by an automation.
    """
    if not deployment_id:
        return "cli"
    if auto_scheduled:
        return "schedule"
    if (created_by_type or "").upper() == "AUTOMATION":
        return "automation"
    return "operator"


# Blob helpers.


def read_blob(container: ContainerClient, name: str) -> tuple[bytes, str] | None:
    """Return a blob's bytes and ETag, or None when it does not exist."""
    try:
        downloader = container.download_blob(name)
        return downloader.readall(), downloader.properties.etag
    except ResourceNotFoundError:
        return None


def blob_sha256(container: ContainerClient, name: str) -> str:
    """Return the sha256 of a stored blob, streamed chunk by chunk."""
    digest = hashlib.sha256()
    for chunk in container.download_blob(name).chunks():
        digest.update(chunk)
    return digest.hexdigest()


def upload_document(
    container: ContainerClient,
    name: str,
    data: bytes,
    etag: str | None = None,
    create: bool = False,
) -> str:
    """Upload JSON bytes and return the new ETag.

    With `create` the blob must not exist (If-None-Match: *); with `etag` it
    must still have that ETag (If-Match).
    """
    options: dict[str, object] = {"overwrite": not create}
    if etag is not None:
        options.update(etag=etag, match_condition=MatchConditions.IfNotModified)
    result = container.get_blob_client(name).upload_blob(
        data,
        content_settings=ContentSettings(
            content_type="application/json",
            content_md5=bytearray(hashlib.md5(data).digest()),
        ),
        **options,
    )
    return result["etag"]


# The head of an org's chain.


@dataclass
class Head:
    """The head document of an org's chain and where it was read from."""

    org: str
    sequence: int
    record: str | None
    sha256: str | None
    pending: dict | None = None
    etag: str | None = None
    archived: bool = False

    def document(self, now: datetime) -> dict:
        return {
            "format": HEAD_FORMAT,
            "org": self.org,
            "sequence": self.sequence,
            "record": self.record,
            "sha256": self.sha256,
            "pending": self.pending,
            "updated": now.isoformat(),
        }


def parse_head(org: str, data: bytes, etag: str | None, archived: bool) -> Head:
    name = head_name(org, archived)
    try:
        document = json.loads(data)
        pending = document.get("pending")
        if pending is not None and not isinstance(pending.get("since"), str):
            raise ValueError("pending mark without a time")
        return Head(
            org=org,
            sequence=int(document["sequence"]),
            record=document.get("record"),
            sha256=document.get("sha256"),
            pending=pending,
            etag=etag,
            archived=archived,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise EvidenceError(
            f"invalid evidence head {name}: not a head document; run `ue-pilot "
            f"evidence verify --org {org}` before writing more records"
        ) from None


def read_head(container: ContainerClient, org: str) -> Head | None:
    """Return the org's head, the archived one when the org has none, or None."""
    for archived in (False, True):
        stored = read_blob(container, head_name(org, archived))
        if stored is not None:
            return parse_head(org, stored[0], stored[1], archived)
    return None


def write_head(container: ContainerClient, head: Head, now: datetime) -> str:
    """Replace the org's active head if it is unchanged, or create it.

    Raises ResourceModifiedError or ResourceExistsError when another writer
    changed or created it first.
    """
    data = canonical_bytes(head.document(now))
    name = head_name(head.org)
    if head.etag is None or head.archived:
        return upload_document(container, name, data, create=True)
    return upload_document(container, name, data, etag=head.etag)


def resolve_pending(container: ContainerClient, head: Head, now: datetime) -> bool:
    """Complete or drop a pending mark left by a writer that died.

    Returns False while the mark is younger than PENDING_TIMEOUT, because its
    writer may still be at work. The record is committed when it is stored
    with the announced sha256, and dropped otherwise.
    """
    pending = head.pending or {}
    since = datetime.fromisoformat(pending.get("since", now.isoformat()))
    if now - since < PENDING_TIMEOUT:
        return False
    stored = read_blob(container, pending.get("record", ""))
    resolved = Head(head.org, head.sequence, head.record, head.sha256, None,
                    head.etag, head.archived)
    if stored is not None and sha256_hex(stored[0]) == pending.get("sha256"):
        resolved.sequence = int(pending["sequence"])
        resolved.record = pending["record"]
        resolved.sha256 = pending["sha256"]
    try:
        write_head(container, resolved, now)
    except (ResourceModifiedError, ResourceExistsError):
        pass
    return True


# Appending.


def utc_now() -> datetime:
    return datetime.now(UTC)


def existing_record(container: ContainerClient, name: str) -> dict | None:
    """Return the append result of a record already stored at `name`, if any.

    A retry of the same flow run finds its own record here and reuses it.
    """
    stored = read_blob(container, name)
    if stored is None:
        return None
    try:
        sequence = json.loads(stored[0]).get("sequence")
    except ValueError:
        sequence = None
    return {"record": name, "sequence": sequence, "sha256": sha256_hex(stored[0]),
            "reused": True}


def append_record(
    container: ContainerClient,
    org: str,
    body: dict,
    now: Callable[[], datetime] = utc_now,
    retried: bool = True,
) -> dict:
    """Store `body` as the org's next record at `body["name"]` and move the head.

    Returns {"record", "sequence", "sha256", "reused"}. A record already at
    that name is returned as it is, with reused True. It is found through the
    head, or by name when `retried` is True because an earlier attempt of the
    run may have written it. A first attempt passes False to save a request.
    Raises ChainConflictError when other writers held the head for every
    attempt, and EvidenceError when the head is unreadable.
    """
    name = body["name"]
    for attempt in range(MAX_APPEND_ATTEMPTS):
        head = read_head(container, org)
        if head is not None and head.pending:
            if not resolve_pending(container, head, now()):
                back_off(attempt)
            continue
        if head is not None and head.record == name:
            return {"record": name, "sequence": head.sequence, "sha256": head.sha256,
                    "reused": True}
        reused = existing_record(container, name) if retried else None
        if reused is not None:
            return reused
        outcome = try_append(container, org, head, body, now())
        if outcome is not None:
            return outcome
        back_off(attempt)
    raise ChainConflictError(
        f"could not append {name}: the evidence head of {org} changed on each of "
        f"{MAX_APPEND_ATTEMPTS} attempts; retry the run"
    )


def try_append(
    container: ContainerClient, org: str, head: Head | None, body: dict,
    moment: datetime,
) -> dict | None:
    """Claim the next sequence number, upload the record, commit the head.

    Returns None when another writer moved the head first; the caller then
    reads the head again.
    """
    base = head or Head(org, 0, None, None)
    sequence = base.sequence + 1
    record = dict(body, sequence=sequence, previous_record=base.record,
                  previous_sha256=base.sha256, recorded=moment.isoformat())
    data = canonical_bytes(record)
    digest = sha256_hex(data)

    # Claim
    claim = Head(org, base.sequence, base.record, base.sha256,
                 {"sequence": sequence, "record": body["name"], "sha256": digest,
                  "since": moment.isoformat()},
                 base.etag, base.archived)
    try:
        claim.etag = write_head(container, claim, moment)
        claim.archived = False
    except (ResourceModifiedError, ResourceExistsError):
        return None

    # Record
    try:
        record_etag = upload_document(container, body["name"], data, create=True)
    except BaseException:
        release(container, base, claim.etag, moment)
        raise

    # Commit
    committed = Head(org, sequence, body["name"], digest, None, claim.etag)
    try:
        write_head(container, committed, moment)
    except ResourceModifiedError:
        discard_unlinked(container, org, sequence, body["name"], record_etag)
        return None
    return {"record": body["name"], "sequence": sequence, "sha256": digest,
            "reused": False}


def release(
    container: ContainerClient, base: Head, etag: str, moment: datetime
) -> None:
    """Drop this writer's claim after a failed upload, so others need not wait."""
    unclaimed = Head(base.org, base.sequence, base.record, base.sha256, None, etag)
    try:
        write_head(container, unclaimed, moment)
    except (ResourceModifiedError, ResourceExistsError):
        pass


def discard_unlinked(
    container: ContainerClient, org: str, sequence: int, name: str, etag: str
) -> None:
    """Delete an uploaded record whose claim another writer dropped as stale.

    A head still below `sequence` proves the record never joined the chain.
    A head at or past it may have been moved there by a writer that completed
    this very record, so the record stays.
    """
    head = read_head(container, org)
    if head is not None and head.sequence >= sequence:
        # NOTE: if another writer both dropped this claim and appended past
        # it, the record stays behind outside the chain and verification
        # reports a fork at its sequence number.
        return
    try:
        container.get_blob_client(name).delete_blob(
            etag=etag, match_condition=MatchConditions.IfNotModified
        )
    except (ResourceNotFoundError, ResourceModifiedError):
        pass


def back_off(attempt: int) -> None:
    """Sleep a random time that grows with the attempt, up to 2 s."""
    time.sleep(random.uniform(0, min(0.05 * 2**attempt, 2.0)))
