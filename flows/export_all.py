"""Export-all: the runbook's "Full Data Export" of one pilot org, into Blob
Storage with a manifest that proves what was stored.

Each export is fetched with the org's session and streamed into a blob at
`<org>/exports/<yyyy>/<mm>/<run-id>/<name>.csv`. The manifest is written last,
only when every export is complete and carries only the org's rows, so its
presence means the export is whole. A re-run writes a new run folder; a retry
of the same run reuses the exports it already stored. Every run that gets past
input validation, complete or not, ends with an evidence record of the org.

Run once: `ue-pilot export-all --org ORG` (or with `--sandbox`).
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.blob_storage import blob_url, open_container, upload_json
from tasks.evidence import evidence_outcome, write_evidence_record
from tasks.exports import OwnershipBreachError, export_to_blob, session_token
from tasks.paging import escalate, page_flow_crash
from ue_pilot.checks import CheckResult, failed, inconclusive, passed
from ue_pilot.orgids import validate_org_id
from ue_pilot.redact import install_log_redaction
from ue_pilot.results import flow_run_settings, key_results_by_run, result_storage
from ue_pilot.settings import Settings


class ExportConfigurationError(ValueError):
    """The export cannot start: unknown export name or no session for the org."""


class ExportIncompleteError(RuntimeError):
    """At least one export could not be stored complete; no manifest was written."""


def select_exports(settings: Settings, names: list[str] | None) -> dict[str, str]:
    """Return {name: route} of the requested exports, every one by default."""
    routes = settings.export_routes()
    if not names:
        return routes
    unknown = [name for name in names if name not in routes]
    if unknown:
        raise ExportConfigurationError(
            f"unknown export(s) {unknown}; configured exports: {sorted(routes)} "
            "(UE_EXPORT_NAMES)"
        )
    return {name: routes[name] for name in dict.fromkeys(names)}


def run_folder(org: str) -> str:
    """Return `<org>/exports/<yyyy>/<mm>/<run-id>` for this flow run."""
    started = runtime.flow_run.scheduled_start_time or datetime.now(UTC)
    return f"{org}/exports/{started:%Y}/{started:%m}/{runtime.flow_run.id}"


@task(
    name="prepare-storage",
    retries=2,
    retry_delay_seconds=[5, 15],
    cache_policy=NO_CACHE,
)
def prepare_storage(settings: Settings) -> str:
    """Open the evidence container, creating it if missing; fail fast if down."""
    container = open_container(settings)
    return container.container_name


@task(
    name="write-manifest", retries=2, retry_delay_seconds=[5, 15], cache_policy=NO_CACHE
)
def write_manifest(settings: Settings, folder: str, manifest: dict) -> dict:
    """Upload manifest.json beside the exports; an existing one is kept."""
    container = open_container(settings, create=False)
    name = f"{folder}/manifest.json"
    if container.get_blob_client(name).exists():
        return {"blob": name, "reused": True}
    return upload_json(container, name, manifest)


@flow(
    name="export-all",
    description="Export every configured export of one org to Blob Storage, with a "
    "manifest of rows, bytes and hashes.",
    persist_result=True,
    result_storage=result_storage(),
    result_serializer="json",
    timeout_seconds=flow_run_settings().export_timeout_seconds,
    on_failure=[page_flow_crash],
    on_crashed=[page_flow_crash],
)
def export_all(org_id: str, exports: list[str] | None = None) -> dict:
    """Export the org's data and return the manifest.

    Args:
        org_id: Clerk organization id of the pilot org to export.
        exports: Names of the exports to take (default: every configured one).
    """
    key_results_by_run()
    logger = get_run_logger()
    settings = Settings()
    install_log_redaction(settings.secret_values())
    org = validate_org_id(org_id, settings.org_id_pattern)
    routes = select_exports(settings, exports)
    try:
        session_token(settings, org)
    except ValueError as error:
        raise ExportConfigurationError(str(error)) from None

    # Storage
    prepare_storage(settings)
    folder = run_folder(org)
    logger.info("exporting %s of %s to %s", sorted(routes), org, folder)

    # Export
    futures = {
        name: export_to_blob.submit(settings, org, name, path, folder)
        for name, path in routes.items()
    }
    results, problems, breach = [], [], None
    for name, future in futures.items():
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, OwnershipBreachError):
            breach = outcome
            problems.append(f"{name}: {outcome}")
        elif isinstance(outcome, BaseException):
            problems.append(f"{name}: {type(outcome).__name__}: {outcome}")
        else:
            results.append(outcome)

    if breach is not None:
        escalate.submit(
            settings,
            [
                failed(
                    "export.ownership",
                    str(breach),
                    org,
                    foreign_rows=breach.foreign_rows,
                )
            ],
        ).result()
    if problems:
        record_export(settings, org, folder, results, problems, breach)
        raise ExportIncompleteError(
            "export incomplete, no manifest written: " + "; ".join(problems)
        )

    # Manifest
    manifest = {
        "org": org,
        "run_id": str(runtime.flow_run.id),
        "folder": folder,
        "created": datetime.now(UTC).isoformat(),
        "format": settings.export_format,
        "exports": results,
    }
    stored = write_manifest(settings, folder, manifest)
    publish_artifacts(settings, manifest, stored)

    # Evidence
    evidence = record_export(settings, org, folder, results, [], None, stored)
    return dict(manifest, manifest_blob=stored, evidence=evidence)


def record_export(
    settings: Settings,
    org: str,
    folder: str,
    results: list[dict],
    problems: list[str],
    breach: OwnershipBreachError | None,
    manifest_blob: dict | None = None,
) -> dict:
    """Write the run's evidence record: its checks, and each stored blob's sha256."""
    artifacts: dict[str, dict] = {
        entry["name"]: {"blob": entry["blob"], "sha256": entry["sha256"]}
        for entry in results
    }
    if manifest_blob is not None:
        artifacts["manifest"] = manifest_blob
    target = {"base_url": settings.base_url, "org": org, "folder": folder,
              "format": settings.export_format}
    records = {org: {"checks": export_checks(org, results, problems, breach),
                     "target": target, "artifacts": artifacts}}
    return evidence_outcome(
        write_evidence_record(settings, "export", records, return_state=True)
    )


def export_checks(
    org: str,
    results: list[dict],
    problems: list[str],
    breach: OwnershipBreachError | None,
) -> list[CheckResult]:
    """Return `export.complete` per export and one `export.ownership` check."""
    checks = [
        passed("export.complete", f"{entry['name']}: {entry['rows']} rows stored "
               "complete", org, export=entry["name"], rows=entry["rows"],
               bytes=entry["bytes"], sha256=entry["sha256"],
               formula_cells=entry["formula_cells"])
        for entry in results
    ]
    checks += [failed("export.complete", problem, org) for problem in problems]
    if breach is not None:
        checks.append(failed("export.ownership", str(breach), org,
                             foreign_rows=breach.foreign_rows))
    elif problems:
        checks.append(inconclusive("export.ownership", "not every export was read "
                                   "to the end", org))
    else:
        checks.append(passed("export.ownership", f"every row of {len(results)} "
                             f"export(s) belongs to {org}", org))
    return checks


def publish_artifacts(settings: Settings, manifest: dict, stored: dict) -> None:
    """Link every blob and tabulate the manifest in the run's artifacts."""
    container = open_container(settings, create=False)
    for entry in manifest["exports"]:
        create_link_artifact(
            key=f"export-{entry['name']}",
            link=blob_url(container, entry["blob"]),
            link_text=entry["blob"],
            description=f"{entry['rows']} rows, sha256 {entry['sha256']}",
        )
    create_link_artifact(
        key="export-manifest",
        link=blob_url(container, stored["blob"]),
        link_text=stored["blob"],
        description="Manifest of this export run",
    )
    create_table_artifact(
        key="export-manifest-table",
        table=[
            {
                key: entry[key]
                for key in (
                    "name",
                    "rows",
                    "bytes",
                    "sha256",
                    "formula_cells",
                    "started",
                    "finished",
                )
            }
            for entry in manifest["exports"]
        ],
        description=f"Exports of {manifest['org']}, run {manifest['run_id']}",
    )
