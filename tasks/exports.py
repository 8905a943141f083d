"""Fetch an org's exports from the UE application into Blob Storage.

The bytes are stored exactly as the API returned them (BOM and encoding kept)
while a scanner reads the same bytes to prove the export complete and owned:
every row's org column must equal the requested org. Nothing is published
unless both hold. A cut stream raises IncompleteExportError, which the task
retries; a foreign row raises OwnershipBreachError, which it does not.
"""

from __future__ import annotations

import base64
import codecs
import csv
import io
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx
from azure.storage.blob import ContainerClient
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.blob_storage import BlockUpload
from ue_pilot.progress import ProgressReporter, artifact_key, format_bytes, percent_of
from ue_pilot.settings import Settings

# Leading characters that make a spreadsheet run a cell as a formula (OWASP,
# "CSV Injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


class IncompleteExportError(RuntimeError):
    """The export stream ended early or its pages do not add up."""


class OwnershipBreachError(RuntimeError):
    """The export of one org carried another org's rows."""

    def __init__(self, message: str, foreign_rows: int) -> None:
        super().__init__(message)
        self.foreign_rows = foreign_rows


@dataclass
class RowScan:
    """Counts over the rows of one export, fed incrementally."""

    org: str
    org_field: str
    rows: int = 0
    foreign_rows: int = 0
    foreign_orgs: set[str] = field(default_factory=set)
    formula_cells: int = 0

    def add(self, values: list[str], org_value: str) -> None:
        self.rows += 1
        if org_value != self.org:
            self.foreign_rows += 1
            if len(self.foreign_orgs) < 10:
                self.foreign_orgs.add(org_value)
        for value in values:
            if value and value.startswith(FORMULA_PREFIXES):
                self.formula_cells += 1


class CsvScanner:
    """Parse CSV records from byte chunks, keeping only counts.

    A record ends at a newline outside quotes; RFC 4180 doubles quotes inside
    a quoted field, so a newline is outside quotes exactly when the quotes
    before it are even in number.
    """

    def __init__(self, scan: RowScan) -> None:
        self.scan = scan
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
        self.pending = ""
        self.org_index: int | None = None

    def feed(self, chunk: bytes) -> None:
        try:
            text = self.pending + self.decoder.decode(chunk)
        except UnicodeDecodeError as error:
            raise IncompleteExportError(f"export is not valid UTF-8: {error}") from None
        cut = self._record_boundary(text)
        self.pending = text[cut:]
        if cut:
            self._parse(text[:cut])

    def _record_boundary(self, text: str) -> int:
        end = text.rfind("\n")
        while end >= 0:
            if text.count('"', 0, end) % 2 == 0:
                return end + 1
            end = text.rfind("\n", 0, end)
        return 0

    def _parse(self, block: str) -> None:
        reader = csv.reader(io.StringIO(block, newline=""))
        if self.org_index is None:
            header = next(reader, None) or []
            if self.scan.org_field not in header:
                raise IncompleteExportError(
                    f"export has no {self.scan.org_field!r} column (header: "
                    f"{header[:10]}); set UE_EXPORT_ORG_FIELD"
                )
            self.org_index = header.index(self.scan.org_field)
        index = self.org_index
        for row in reader:
            if row:
                self.scan.add(row, row[index] if index < len(row) else "")

    def finish(self) -> None:
        """Raise IncompleteExportError unless the stream ended after a record."""
        rest = self.pending + self.decoder.decode(b"", final=True)
        if rest:
            raise IncompleteExportError(
                f"export ends inside a record ({len(rest)} characters after the "
                "last complete record)"
            )
        if self.org_index is None:
            raise IncompleteExportError("export has no header row")


@dataclass
class ExportResult:
    """Manifest entry of one stored export, without any row content."""

    name: str
    source_url: str
    content_type: str
    rows: int
    formula_cells: int
    started: str
    finished: str
    blob: str = ""
    bytes: int = 0
    sha256: str = ""
    md5: str = ""
    pages: int = 0

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def source_url(settings: Settings, path: str, org: str) -> str:
    """Return the export URL with its query; the session token is a header."""
    return f"{settings.base_url}{path}?orgId={org}&format={settings.export_format}"


def session_token(settings: Settings, org: str) -> str:
    """Return the org's session that fetches exports, preferring the export role."""
    sessions = settings.probe_session_map().get(org, {})
    token = sessions.get(settings.export_session_role) or next(
        iter(sessions.values()), None
    )
    if not token:
        raise ValueError(
            f"no session for org {org!r} in UE_PROBE_SESSIONS; add one with role "
            f"{settings.export_session_role!r}"
        )
    return token


def check_status(response: httpx.Response, url: str) -> None:
    if response.status_code != 200:
        raise RuntimeError(
            f"export request failed: HTTP {response.status_code} for {url}"
        )


def stream_csv(
    client: httpx.Client,
    settings: Settings,
    url: str,
    token: str,
    upload: BlockUpload,
    scan: RowScan,
    progress: ProgressReporter | None = None,
) -> str:
    """Stream one CSV export into `upload`; return its content type.

    The percentage reported to `progress` is known only when the response
    declares a Content-Length.
    """
    scanner = CsvScanner(scan)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with client.stream("GET", url, headers=headers) as response:
            check_status(response, url)
            declared = response.headers.get("content-length")
            total = int(declared) if declared and declared.isdigit() else None
            received = 0
            for chunk in response.iter_raw():
                received += len(chunk)
                upload.write(chunk)
                scanner.feed(chunk)
                if progress is not None:
                    progress.report(
                        percent_of(received, total),
                        f"{format_bytes(received)}, {scan.rows:,} rows",
                    )
            content_type = response.headers.get("content-type", "text/csv")
    except httpx.TransportError as error:
        raise IncompleteExportError(
            f"export stream broke after {upload.size} bytes: "
            f"{type(error).__name__}: {error}"
        ) from None
    if declared is not None and int(declared) != received:
        raise IncompleteExportError(
            f"export sent {received} bytes but declared Content-Length {declared}"
        )
    scanner.finish()
    return content_type


def stream_json_pages(
    client: httpx.Client,
    settings: Settings,
    url: str,
    token: str,
    upload: BlockUpload,
    scan: RowScan,
    progress: ProgressReporter | None = None,
) -> int:
    """Follow `next` to the end, storing the pages as one JSON array.

    Each page's bytes are kept exactly. The rows must add up to `count` with no
    id served twice, so a sort order that shifts between pages is caught.
    """
    origin = urlsplit(settings.base_url)
    headers = {"Authorization": f"Bearer {token}"}
    # NOTE: the set of ids grows with the export, about 60 bytes a row, so
    # memory is flat for CSV exports but not for very large paged JSON ones.
    seen_ids: set[object] = set()
    expected = None
    pages = 0
    upload.write(b"[")
    while url:
        target = urlsplit(url)
        if (target.scheme, target.netloc) != (origin.scheme, origin.netloc):
            raise IncompleteExportError(
                f"page link {url!r} leaves {settings.base_url}; the session token "
                "is not sent elsewhere"
            )
        try:
            response = client.get(url, headers=headers)
        except httpx.TransportError as error:
            raise IncompleteExportError(
                f"page {pages + 1} failed: {type(error).__name__}: {error}"
            ) from None
        check_status(response, url)
        try:
            body = response.json()
            results = body["results"]
            count = int(body["count"])
        except (ValueError, KeyError, TypeError):
            raise IncompleteExportError(
                f"page {pages + 1} is not a {{count, next, previous, results}} page"
            ) from None
        if expected is None:
            expected = count
        elif count != expected:
            raise IncompleteExportError(
                f"count changed from {expected} to {count} between pages"
            )
        upload.write((b"," if pages else b"") + response.content)
        pages += 1
        for row in results:
            row_id = row.get("id")
            if row_id in seen_ids:
                raise IncompleteExportError(
                    f"id {row_id!r} served twice (on page {pages}): the sort order "
                    "shifted between pages"
                )
            seen_ids.add(row_id)
            values = [v for v in row.values() if isinstance(v, str)]
            scan.add(values, str(row.get(scan.org_field, "")))
        if progress is not None:
            progress.report(
                percent_of(scan.rows, expected),
                f"{scan.rows:,} of {expected:,} rows, {pages} page(s)",
            )
        url = body.get("next")
    upload.write(b"]")
    if scan.rows != (expected or 0):
        raise IncompleteExportError(
            f"fetched {scan.rows} rows but the API counted {expected}"
        )
    return pages


def fetch_into(
    container: ContainerClient,
    settings: Settings,
    org: str,
    name: str,
    path: str,
    blob_name: str,
    progress: ProgressReporter | None = None,
) -> tuple[ExportResult, BlockUpload, RowScan]:
    """Fetch one export into a staged, not yet committed, blob."""
    url = source_url(settings, path, org)
    token = session_token(settings, org)
    is_json = settings.export_format == "json"
    upload = BlockUpload(
        container, blob_name, "application/json" if is_json else "text/csv"
    )
    scan = RowScan(org, settings.export_org_field)
    started = datetime.now(UTC).isoformat()
    with httpx.Client(
        timeout=httpx.Timeout(60.0, connect=10.0),
        trust_env=False,
        follow_redirects=False,
    ) as client:
        if is_json:
            pages = stream_json_pages(client, settings, url, token, upload, scan,
                                      progress)
            content_type = "application/json"
        else:
            pages = 0
            content_type = stream_csv(client, settings, url, token, upload, scan,
                                      progress)
    result = ExportResult(
        name=name,
        source_url=url,
        content_type=content_type,
        rows=scan.rows,
        formula_cells=scan.formula_cells,
        started=started,
        finished=datetime.now(UTC).isoformat(),
        pages=pages,
    )
    return result, upload, scan


# Manifest fields kept in the blob's metadata, so a re-run can list a stored
# export without fetching it again.
METADATA_FIELDS = (
    "name",
    "source_url",
    "content_type",
    "rows",
    "formula_cells",
    "started",
    "finished",
    "pages",
)


def stored_result(blob) -> dict[str, object]:
    """Rebuild the manifest entry of an export committed by an earlier attempt."""
    properties = blob.get_blob_properties()
    meta = properties.metadata
    md5 = properties.content_settings.content_md5
    result = ExportResult(
        name=meta["name"],
        source_url=meta["source_url"],
        content_type=meta["content_type"],
        rows=int(meta["rows"]),
        formula_cells=int(meta["formula_cells"]),
        started=meta["started"],
        finished=meta["finished"],
        blob=blob.blob_name,
        bytes=properties.size,
        sha256=meta["sha256"],
        md5=base64.b64encode(bytes(md5)).decode(),
        pages=int(meta["pages"]),
    )
    return result.to_dict()


def not_a_breach(task, task_run, state) -> bool:
    """Retry anything but an ownership breach, which a retry cannot make safe."""
    try:
        state.result()
    except OwnershipBreachError:
        return False
    except Exception:
        return True
    return True


@task(
    name="export-to-blob",
    retries=3,
    retry_delay_seconds=[2, 5, 10],
    retry_condition_fn=not_a_breach,
    cache_policy=NO_CACHE,
)
def export_to_blob(
    settings: Settings, org: str, name: str, path: str, folder: str
) -> dict[str, object]:
    """Fetch one export and publish it under `folder` once complete and owned.

    A breach stores the fetched bytes under `quarantine/` instead, for the
    investigation, and raises OwnershipBreachError. Progress goes to the
    progress artifact `export-progress-<name>` of the task run (and to the
    CLI's progress line), at most once a second.
    """
    progress = ProgressReporter(artifact_key("export-progress", name),
                                f"export {name}")
    try:
        result = store_export(settings, org, name, path, folder, progress)
    except BaseException as error:
        progress.finish(f"failed: {type(error).__name__}", failed=True)
        raise
    progress.finish(
        f"{result['rows']:,} rows, {format_bytes(result['bytes'])} stored"
    )
    return result


def store_export(
    settings: Settings,
    org: str,
    name: str,
    path: str,
    folder: str,
    progress: ProgressReporter,
) -> dict[str, object]:
    """Reuse, quarantine or commit one export, reporting to `progress`."""
    from tasks.blob_storage import open_container

    logger = get_run_logger()
    container = open_container(settings)
    extension = "json" if settings.export_format == "json" else "csv"
    blob_name = f"{folder}/{name}.{extension}"
    existing = container.get_blob_client(blob_name)
    if existing.exists():
        # A re-run of the same flow run: the export was committed complete.
        logger.info("export %s of %s already stored at %s", name, org, blob_name)
        return stored_result(existing)

    result, upload, scan = fetch_into(container, settings, org, name, path, blob_name,
                                      progress)
    if scan.foreign_rows:
        # The staged blocks are never committed. The bytes are fetched again
        # into the quarantine blob, as evidence for the investigation.
        quarantine = f"quarantine/{blob_name}"
        logger.error(
            "export %s of %s carries %d foreign row(s); quarantined at %s",
            name,
            org,
            scan.foreign_rows,
            quarantine,
        )
        _, quarantined, _ = fetch_into(container, settings, org, name, path, quarantine)
        quarantined.commit({"org": org, "export": name, "status": "quarantined"})
        raise OwnershipBreachError(
            f"export {name!r} of {org} carries {scan.foreign_rows} row(s) of other "
            f"org(s) {sorted(scan.foreign_orgs)}; quarantined at {quarantine}",
            scan.foreign_rows,
        )

    metadata = {
        key: str(value)
        for key, value in result.to_dict().items()
        if key in METADATA_FIELDS
    }
    metadata.update(org=org, sha256=upload.sha256.hexdigest(), status="complete")
    stored = upload.commit(metadata)
    result.blob, result.bytes = stored["blob"], stored["bytes"]
    result.sha256, result.md5 = stored["sha256"], stored["md5"]
    logger.info(
        "export %s of %s: %d rows, %d bytes", name, org, result.rows, result.bytes
    )
    return result.to_dict()
