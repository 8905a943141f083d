"""The `ue-pilot` command line.

Exit status of `audit`: 0 pass, 1 fail, 3 inconclusive, 2 usage or settings
error (nothing was run, including a sandbox that could not start), 130
interrupted by Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter

import click
from pydantic import ValidationError

from ue_pilot.sandbox.faults import FAULTS

EXIT_CODES = {"pass": 0, "fail": 1, "inconclusive": 3}
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

fault_option = click.option(
    "--fault",
    "faults",
    multiple=True,
    type=click.Choice(sorted(FAULTS)),
    help="Sandbox fault to switch on (repeatable).",
)


def raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def keep_prefect_local() -> None:
    """Stop Prefect from sending analytics and give its temporary server time to
    start. Call it before prefect is imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT", "false")
    # With a new PREFECT_HOME the server first migrates its database and registers
    # the block types of every installed collection (prefect-azure and
    # prefect-docker too). On a busy 2-core machine the first flow run then
    # started 23 to 48 s after the call, and Prefect's default limit is 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def load_settings():
    from ue_pilot.settings import Settings

    try:
        return Settings()
    except ValidationError as error:
        lines = [
            f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
            for e in error.errors()
        ]
        raise click.UsageError("invalid UE_ settings:\n" + "\n".join(lines)) from None


@click.group()
@click.version_option(package_name="ue-pilot")
def main() -> None:
    """Operations tool of the Union-Eyes pilot: the runbook as Prefect flows."""


@main.command()
@click.option(
    "--sandbox",
    is_flag=True,
    help="Start the bundled sandbox pilot for this run and audit it.",
)
@fault_option
@click.option(
    "--org",
    "orgs",
    multiple=True,
    help="Audit only this pilot org (repeatable). Default: every pilot org.",
)
@click.option(
    "--sandbox-orgs",
    default=3,
    show_default=True,
    type=click.IntRange(1),
    help="Number of orgs the sandbox seeds.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print one JSON object {"verdict", "checks"} instead of a summary.',
)
def audit(
    sandbox: bool,
    faults: tuple[str, ...],
    orgs: tuple[str, ...],
    sandbox_orgs: int,
    as_json: bool,
) -> None:
    """Run the isolation audit once and print its verdict."""
    if faults and not sandbox:
        raise click.UsageError(
            "--fault needs --sandbox: faults exist only in the bundled sandbox"
        )
    keep_prefect_local()
    from ue_pilot.sandbox.runner import SandboxProcess, SandboxStartError

    # SIGTERM (a timeout wrapper, a cancelled CI job) unwinds like Ctrl-C, so
    # the sandbox child and Prefect's temporary server are stopped too.
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        if not sandbox:
            sys.exit(run_audit(list(orgs), as_json))
        try:
            process = SandboxProcess(orgs=sandbox_orgs, faults=faults)
        except SandboxStartError as error:
            click.echo(f"Error: {error.summary()}", err=True)
            sys.exit(EXIT_USAGE)
        with process:
            os.environ.update(process.env)
            code = run_audit(list(orgs), as_json, sandbox=True)
        sys.exit(code)
    except KeyboardInterrupt:
        click.echo("Interrupted: the audit did not finish.", err=True)
        sys.exit(EXIT_INTERRUPTED)


def run_audit(orgs: list[str], as_json: bool, sandbox: bool = False) -> int:
    """Validate the settings and orgs, run the flow, print the outcome."""
    settings = load_settings()
    from flows.isolation_audit import AuditConfigurationError, select_orgs
    from ue_pilot.orgids import InvalidOrgIdError

    try:
        select_orgs(settings, orgs)
    except (AuditConfigurationError, InvalidOrgIdError) as error:
        raise click.UsageError(str(error)) from None

    from flows.isolation_audit import isolation_audit

    result = isolation_audit(orgs=orgs or None)
    if as_json:
        checks = [
            {key: check[key] for key in ("id", "org", "status", "observed")}
            for check in result["checks"]
        ]
        click.echo(
            json.dumps({"verdict": result["verdict"], "checks": checks}, default=str)
        )
    else:
        click.echo(render_summary(result, sandbox))
    return EXIT_CODES[result["verdict"]]


def render_summary(result: dict, sandbox: bool = False) -> str:
    """Render the verdict, then each check id with its outcomes."""
    checks = result["checks"]
    lines = [
        f"Isolation audit: {result['verdict'].upper()}",
        f"Target {result['target']['base_url']}, {result['target']['orgs']} org(s); "
        f"window {result['window']['start']} .. {result['window']['end']}",
        "",
    ]

    by_id: dict[str, Counter] = {}
    for check in checks:
        by_id.setdefault(check["id"], Counter())[check["status"]] += 1
    width = max(len(check_id) for check_id in by_id)
    for check_id, counts in by_id.items():
        parts = [
            f"{counts[s]} {s}" for s in ("pass", "fail", "inconclusive") if counts[s]
        ]
        lines.append(f"  {check_id:<{width}}  {', '.join(parts)}")

    paging = result.get("paging") or {}
    if "skipped" in paging:
        lines += ["", f"Paging skipped: {paging['skipped']}"]
    elif paging:
        lines += ["", f"Paging: {len(paging['triggered'])} triggered, "
                  f"{len(paging['resolved'])} resolved, "
                  f"{len(paging['errors'])} not delivered"]

    evidence = result.get("evidence") or {}
    if "skipped" in evidence:
        lines += ["", f"Evidence records skipped: {evidence['skipped']}"]
        if sandbox:
            lines.append("  (`audit --sandbox` runs without Azurite; audit a sandbox "
                         "from `ue-pilot sandbox up` to write records)")
    elif "error" in evidence:
        lines += ["", f"Evidence records NOT written: {evidence['error']}"]
    elif evidence:
        lines += ["", f"Evidence records: {len(evidence['records'])} in Blob Storage"]

    problems = [c for c in checks if c["status"] != "pass"]
    if problems:
        lines += ["", "Not passing:"]
        for check in problems[:40]:
            scope = check["org"] or "deployment"
            lines.append(
                f"  {check['status']:<12} {check['id']} ({scope}): {check['summary']}"
            )
        if len(problems) > 40:
            lines.append(f"  ... and {len(problems) - 40} more (use --json)")
    return "\n".join(lines)


@main.command("export-all")
@click.option("--org", "org", required=True, help="Pilot org id to export.")
@click.option("--export", "exports", multiple=True,
              help="Export name to take (repeatable). Default: every configured one.")
@click.option("--sandbox", is_flag=True,
              help="Start the bundled sandbox (with Azurite) for this run.")
@fault_option
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_all_command(org: str, exports: tuple[str, ...], sandbox: bool,
                       faults: tuple[str, ...], as_json: bool) -> None:
    """Export one org's data to Blob Storage with a manifest (exit 0 complete)."""
    if faults and not sandbox:
        raise click.UsageError("--fault needs --sandbox: faults exist only in the "
                               "bundled sandbox")
    from ue_pilot.orgids import InvalidOrgIdError, validate_org_id

    try:
        validate_org_id(org)
    except InvalidOrgIdError as error:
        raise click.UsageError(str(error)) from None
    keep_prefect_local()
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        if not sandbox:
            sys.exit(run_export(org, list(exports), as_json))
        from ue_pilot.sandbox.runner import SandboxProcess, SandboxStartError

        try:
            process = SandboxProcess(orgs=3, faults=faults, storage=True)
        except SandboxStartError as error:
            click.echo(f"Error: {error.summary()}", err=True)
            sys.exit(EXIT_USAGE)
        with process:
            os.environ.update(process.env)
            code = run_export(org, list(exports), as_json)
        sys.exit(code)
    except KeyboardInterrupt:
        click.echo("Interrupted: the export did not finish.", err=True)
        sys.exit(EXIT_INTERRUPTED)


def run_export(org: str, exports: list[str], as_json: bool) -> int:
    """Validate, run the export-all flow, print the manifest or the failure."""
    settings = load_settings()
    from flows.export_all import ExportConfigurationError, export_all, select_exports
    from ue_pilot.orgids import InvalidOrgIdError, validate_org_id

    try:
        validate_org_id(org, settings.org_id_pattern)
        select_exports(settings, exports)
    except (ExportConfigurationError, InvalidOrgIdError) as error:
        raise click.UsageError(str(error)) from None

    from ue_pilot.progress import terminal_progress

    # A progress line on standard error, only when it is a terminal.
    with terminal_progress(sys.stderr, enabled=not as_json):
        state = export_all(org_id=org, exports=exports or None, return_state=True)
    if not state.is_completed():
        message = state.message or state.name
        try:
            state.result()
        except Exception as error:  # the flow's own failure, shown to the operator
            message = f"{type(error).__name__}: {error}"
        if isinstance(message, str) and "ExportConfigurationError" in message:
            raise click.UsageError(message)
        click.echo(f"Export FAILED: {message}", err=True)
        if as_json:
            click.echo(json.dumps(
                {"org": org, "outcome": "failed", "error": str(message)}, indent=2
            ))
        return 1
    manifest = state.result()
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
    else:
        click.echo(f"Export complete: {manifest['folder']}")
        for entry in manifest["exports"]:
            click.echo(f"  {entry['name']:<10} {entry['rows']:>9} rows "
                       f"{entry['bytes']:>12} bytes  sha256 {entry['sha256']}")
    return 0


@main.group()
def evidence() -> None:
    """Verify, export and report the evidence records kept in Blob Storage."""


def open_evidence(org: str):
    """Validate `org` and open the evidence container; exit 2 or 3 if impossible."""
    settings = load_settings()
    from azure.core.exceptions import AzureError

    from tasks.blob_storage import StorageUnavailableError, open_container
    from ue_pilot.orgids import InvalidOrgIdError, validate_org_id

    try:
        validate_org_id(org, settings.org_id_pattern)
    except InvalidOrgIdError as error:
        raise click.UsageError(str(error)) from None
    if not (settings.blob_connection_string.get_secret_value()
            or settings.blob_account_url):
        raise click.UsageError("no Blob Storage configured: set "
                               "UE_BLOB_CONNECTION_STRING or UE_BLOB_ACCOUNT_URL")
    try:
        container = open_container(settings, create=False)
        found = container.exists()
    except (StorageUnavailableError, AzureError) as error:
        click.echo(f"Error: {str(error).splitlines()[0][:300]}", err=True)
        sys.exit(EXIT_CODES["inconclusive"])
    if not found:
        click.echo(f"Error: container {settings.blob_container!r} not found: no "
                   "evidence to read (UE_BLOB_CONTAINER)", err=True)
        sys.exit(EXIT_CODES["inconclusive"])
    return container


@evidence.command("verify")
@click.option("--org", required=True, help="Org id whose evidence chain to verify.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as one JSON object.")
def evidence_verify(org: str, as_json: bool) -> None:
    """Check that no evidence record of ORG was edited, deleted or reordered.

    Exit status: 0 intact, 1 tampered, 2 bad input, 3 nothing to verify or
    storage unreachable.
    """
    container = open_evidence(org)
    from ue_pilot.evidence_verify import verify_chain

    report = verify_chain(container, org)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo("\n".join(report.lines()))
        if report.status == "empty":
            click.echo(empty_evidence_hint(org, container.container_name))
    sys.exit({"intact": 0, "tampered": 1, "empty": 3}[report.status])


def empty_evidence_hint(org: str, container_name: str) -> str:
    """Return a hint naming the container read and whether the org is a pilot org."""
    pilot = load_settings().pilot_org_ids
    listed = (
        "UE_PILOT_ORG_IDS lists it"
        if org in pilot
        else "UE_PILOT_ORG_IDS does not list it; check the org id"
    )
    return (
        f"No record under {org}/ or archived/{org}/ in container "
        f"{container_name!r}; {listed}. Records appear after a flow run with Blob "
        "Storage configured."
    )


@evidence.command("export")
@click.option("--org", required=True, help="Org id whose evidence to export.")
@click.option("--format", "output_format", type=click.Choice(["oscal"]),
              default="oscal", show_default=True,
              help="Output format: OSCAL assessment-results JSON.")
@click.option("--output", type=click.Path(dir_okay=False, writable=True),
              help="File to write (default: standard output).")
def evidence_export(org: str, output_format: str, output: str | None) -> None:
    """Export ORG's evidence records, after verifying their chain.

    Exit status: 0 written, 1 chain not intact (nothing written), 2 bad input,
    3 nothing to export or storage unreachable.
    """
    container = open_evidence(org)
    from ue_pilot.evidence_verify import verify_chain
    from ue_pilot.oscal import to_oscal

    report = verify_chain(container, org)
    if report.status != "intact":
        click.echo("\n".join(report.lines()), err=True)
        click.echo(f"Nothing exported: the evidence of {org} is not intact.", err=True)
        sys.exit({"tampered": 1, "empty": 3}[report.status])
    text = json.dumps(to_oscal(report), indent=2) + "\n"
    if output:
        with open(output, "w", encoding="utf-8") as handle:
            handle.write(text)
        click.echo(f"Wrote {len(report.records)} record(s) of {org} to {output}",
                   err=True)
    else:
        click.echo(text, nl=False)


@evidence.command("report")
@click.option("--org", required=True, help="Org id whose runs and evidence to report.")
@click.option("--since", "since_text", default="30d", show_default=True,
              help="Period back from now, in whole days (30d) or hours (12h).")
@click.option("--output", type=click.Path(file_okay=False),
              help="Folder for report.html, report.md and timeline.png "
                   "(default: reports/<org>/).")
def evidence_report(org: str, since_text: str, output: str | None) -> None:
    """Write an HTML and Markdown report of ORG's flow runs and evidence records.

    Exit status: 0 written, 1 written but the evidence chain is not intact,
    2 bad input, 3 nothing to report, storage unreachable, or written without
    the run history because the Prefect API could not be read.
    """
    keep_prefect_local()
    from pathlib import Path

    from ue_pilot.evidence_report import (
        InvalidSinceError,
        exit_status,
        parse_since,
        produce_report,
        summary_lines,
    )

    try:
        parse_since(since_text)
    except InvalidSinceError as error:
        raise click.UsageError(str(error)) from None
    container = open_evidence(org)
    settings = load_settings()
    directory = Path(output) if output else Path("reports") / org
    report, written = produce_report(container, org, since_text,
                                     settings.pilot_org_ids,
                                     settings.secret_values(), directory)
    click.echo("\n".join(summary_lines(report, written)))
    sys.exit(exit_status(report, written))


@main.command("serve")
@click.option(
    "--port",
    default=4200,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port on 127.0.0.1 of the local Prefect server, started only when "
    "PREFECT_API_URL is not set.",
)
def serve_command(port: int) -> None:
    """Serve every deployment from this process until Ctrl-C or SIGTERM.

    With PREFECT_API_URL unset, a local Prefect server (SQLite under
    PREFECT_HOME, UI on 127.0.0.1) runs alongside and stops on exit.
    """
    keep_prefect_local()
    signal.signal(signal.SIGTERM, raise_interrupt)
    from deployments.serve import PrefectServerStartError, serve_all

    try:
        serve_all(port)
    except ValidationError as error:
        lines = [
            f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
            for e in error.errors()
        ]
        raise click.UsageError("invalid UE_ settings:\n" + "\n".join(lines)) from None
    except PrefectServerStartError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo("Interrupted: serve stopped.", err=True)
        sys.exit(EXIT_INTERRUPTED)


@main.command("rollback")
@click.option("--org", required=True,
              help="Pilot org id to roll back; it is also the org id the approval "
              "types.")
@click.option("--reason", required=True, help="Why the org is rolled back.")
@click.option("--requested-by", default=None,
              help="Who requests the rollback. Default: your login name.")
@click.option("--approve-as", default=None,
              help="Name of the person approving the plan; not the requester. "
              "Required unless --dry-run.")
@click.option("--comment", default="approved from the ue-pilot command line",
              show_default=True, help="Comment recorded with the approval.")
@click.option("--dry-run", is_flag=True, help="Show the plan and change nothing.")
@click.option("--sandbox", is_flag=True,
              help="Start the bundled sandbox (with Azurite) for this run.")
@fault_option
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as JSON (the plan goes to standard error).")
def rollback_command(org: str, reason: str, requested_by: str | None,
                     approve_as: str | None, comment: str, dry_run: bool,
                     sandbox: bool, faults: tuple[str, ...], as_json: bool) -> None:
    """Roll back one pilot org: show the plan, approve it, run the steps.

    Exit status: 0 rolled back, already rolled back or dry run; 1 failed; 2 bad
    input (nothing changed); 3 sessions could not be verified; 130 interrupted.
    """
    if faults and not sandbox:
        raise click.UsageError("--fault needs --sandbox: faults exist only in the "
                               "bundled sandbox")
    requested_by = requested_by or login_name()
    if not dry_run and not (approve_as or "").strip():
        raise click.UsageError("--approve-as NAME is required to roll back (or "
                               "use --dry-run)")
    if approve_as and approve_as.strip().casefold() == requested_by.strip().casefold():
        raise click.UsageError(f"{approve_as!r} requests the rollback and cannot "
                               "also approve it; another person must --approve-as")
    from ue_pilot.orgids import InvalidOrgIdError, validate_org_id

    try:
        validate_org_id(org)
    except InvalidOrgIdError as error:
        raise click.UsageError(str(error)) from None
    keep_prefect_local()
    signal.signal(signal.SIGTERM, raise_interrupt)
    request = {"org_id": org, "reason": reason, "requested_by": requested_by,
               "dry_run": dry_run}
    approval = {"org_id": org, "approver": approve_as or "", "comment": comment}
    try:
        if not sandbox:
            sys.exit(run_rollback(request, approval, as_json))
        from ue_pilot.sandbox.runner import SandboxProcess, SandboxStartError

        try:
            process = SandboxProcess(orgs=3, faults=faults, storage=True)
        except SandboxStartError as error:
            click.echo(f"Error: {error.summary()}", err=True)
            sys.exit(EXIT_USAGE)
        with process:
            os.environ.update(process.env)
            # The sandbox's traffic lands once a minute; poll more often than that.
            os.environ.setdefault("UE_ROLLBACK_TELEMETRY_POLL_SECONDS", "5")
            code = run_rollback(request, approval, as_json)
        sys.exit(code)
    except KeyboardInterrupt:
        click.echo("Interrupted: the rollback did not finish; run it again to "
                   "continue where it stopped.", err=True)
        sys.exit(EXIT_INTERRUPTED)


def login_name() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        raise click.UsageError("cannot tell your login name: pass --requested-by "
                               "NAME") from None


def run_rollback(request: dict, approval: dict, as_json: bool) -> int:
    """Check the request, run the rollback flow, approve it and print the outcome."""
    settings = load_settings()
    from flows.rollback import (
        PLAN_ARTIFACT,
        RollbackRequestError,
        VerificationInconclusiveError,
        check_notify_setting,
        check_request,
        find_organization,
        rollback,
    )
    from tasks.identity import IdentityProviderError, open_clerk
    from ue_pilot.approvals import PauseResponder, create_flow_run, execute_flow_run
    from ue_pilot.orgids import InvalidOrgIdError
    from ue_pilot.progress import terminal_progress

    try:
        check_request(settings, request["org_id"], request["reason"],
                      request["requested_by"])
        if not request["dry_run"]:
            check_notify_setting(settings)
        find_organization(open_clerk(settings), request["org_id"])
    except (InvalidOrgIdError, RollbackRequestError) as error:
        raise click.UsageError(str(error)) from None
    except IdentityProviderError as error:
        click.echo(f"Error: {error}", err=True)
        return EXIT_CODES["fail"]

    def show_plan(markdown: str) -> None:
        click.echo(markdown + "\n", err=as_json)
        click.echo(f"Approving as {approval['approver']}.", err=True)

    flow_run = create_flow_run(rollback, request)
    responder = PauseResponder(flow_run.id, approval, PLAN_ARTIFACT, show_plan)
    if not request["dry_run"]:
        responder.start()
    try:
        # The export and archive steps draw a progress line on a terminal.
        with terminal_progress(sys.stderr, enabled=not as_json):
            state = execute_flow_run(rollback, flow_run, request)
    finally:
        responder.stop()
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        click.echo(f"Rollback FAILED: {error}", err=True)
        inconclusive = isinstance(error, VerificationInconclusiveError)
        if as_json:
            click.echo(json.dumps({
                "org": request["org_id"],
                "outcome": "inconclusive" if inconclusive else "failed",
                "run_id": str(flow_run.id),
                "error_type": type(error).__name__,
                "error": str(error),
            }, indent=2))
        return EXIT_CODES["inconclusive"] if inconclusive else EXIT_CODES["fail"]
    result = state.result()
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return 0
    if result["outcome"] != "rolled-back":
        click.echo(result["plan_markdown"] + "\n")
    else:
        for row in result["steps"]:
            click.echo(f"  {row['outcome']:<8} {row['step']}: {row['detail']}")
    click.echo(result["message"])
    return 0


@main.command("onboard")
@click.option("--name", required=True, help="Display name of the new org in Clerk.")
@click.option("--slug", required=True,
              help="Clerk slug of the new org: lowercase letters, digits, dashes.")
@click.option("--created-by", default=None,
              help="Clerk user id of the creating operator. Default: "
              "UE_ONBOARDING_CREATED_BY.")
@click.option("--seeds", "seed_dir", default=None,
              type=click.Path(file_okay=False),
              help="Folder of the org's seed scripts (*.sql). Default: "
              "UE_SEED_SCRIPTS_DIR.")
@click.option("--sandbox", is_flag=True,
              help="Start the bundled sandbox for this run and onboard into it.")
@fault_option
@click.option("--json", "as_json", is_flag=True,
              help="Print the result, every step's checks included, as JSON.")
def onboard_command(name: str, slug: str, created_by: str | None,
                    seed_dir: str | None, sandbox: bool, faults: tuple[str, ...],
                    as_json: bool) -> None:
    """Onboard a new pilot org: the runbook's seven onboarding steps.

    Exit status: 0 onboarded; 1 a step failed (the org, if created, is
    disabled); 2 bad input or settings (nothing changed); 130 interrupted.
    """
    if faults and not sandbox:
        raise click.UsageError("--fault needs --sandbox: faults exist only in the "
                               "bundled sandbox")
    from tasks.identity import InvalidOrgRequestError, validate_org_name, validate_slug

    try:
        validate_org_name(name)
        validate_slug(slug)
    except InvalidOrgRequestError as error:
        raise click.UsageError(str(error)) from None
    keep_prefect_local()
    signal.signal(signal.SIGTERM, raise_interrupt)
    request = {"name": name, "slug": slug, "created_by": created_by,
               "seed_dir": seed_dir}
    try:
        if not sandbox:
            sys.exit(run_onboarding(request, as_json))
        from ue_pilot.sandbox.runner import SandboxProcess, SandboxStartError

        try:
            process = SandboxProcess(orgs=3, faults=faults)
        except SandboxStartError as error:
            click.echo(f"Error: {error.summary()}", err=True)
            sys.exit(EXIT_USAGE)
        with process:
            os.environ.update(process.env)
            # The sandbox's Logs stand-in returns an event at once, not minutes later.
            os.environ.setdefault("UE_ONBOARDING_DETECTION_TIMEOUT_SECONDS", "30")
            code = run_onboarding(request, as_json)
        sys.exit(code)
    except KeyboardInterrupt:
        click.echo("Interrupted: onboarding did not finish; run it again to adopt "
                   "the org and continue.", err=True)
        sys.exit(EXIT_INTERRUPTED)


def run_onboarding(request: dict, as_json: bool) -> int:
    """Fill in the defaults, validate everything, run the flow, print the outcome."""
    settings = load_settings()
    from flows.onboarding import OnboardingRequestError, onboarding, validate_request

    request = dict(
        request,
        created_by=request["created_by"] or settings.onboarding_created_by,
        seed_dir=request["seed_dir"] or settings.seed_scripts_dir,
    )
    try:
        validate_request(**request)
    except OnboardingRequestError as error:
        raise click.UsageError(str(error)) from None
    state = onboarding(**request, return_state=True)
    result = state.result(raise_on_failure=False)
    if not isinstance(result, dict):
        click.echo(f"Onboarding FAILED: {result}", err=True)
        return EXIT_CODES["fail"]
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(render_onboarding(result))
    return 0 if result["outcome"] == "onboarded" else EXIT_CODES["fail"]


def render_onboarding(result: dict) -> str:
    """Render the outcome, each step's status, and the failure and compensation."""
    org = result["org"] or {}
    lines = [
        f"Onboarding: {result['outcome'].upper()}",
        f"Org {org.get('org', '(not created)')} ({org.get('slug', '')}), "
        f"{org.get('outcome', 'no org')}, status {org.get('status', '-')}",
        "",
    ]
    for step in result["steps"]:
        lines.append(f"  {step['number']}. {step['title']:<36} {step['status']}")
        for check in step["checks"]:
            if check["status"] != "pass":
                lines.append(f"       {check['status']:<12} {check['id']}: "
                             f"{check['summary']}")
    failure = result.get("failure")
    if failure:
        lines += ["", f"Failed at step {failure['step']}: {failure['error']}"]
        compensation = result.get("compensation")
        if compensation:
            lines.append(f"Compensation {compensation['status']}: "
                         f"{compensation['summary']}")
        else:
            lines.append("No org was created or adopted; nothing was disabled.")
    return "\n".join(lines)


@main.group()
def sandbox() -> None:
    """Run the bundled sandbox pilot: every service the audit talks to, on 127.0.0.1."""


@sandbox.command("up")
@click.option(
    "--orgs",
    default=3,
    show_default=True,
    type=click.IntRange(1),
    help="Number of orgs to seed.",
)
@click.option(
    "--storage/--no-storage",
    default=True,
    show_default=True,
    help="Also run Azurite, for export-all, rollback and the evidence commands.",
)
@fault_option
def sandbox_up(orgs: int, storage: bool, faults: tuple[str, ...]) -> None:
    """Run the sandbox in the foreground and print the UE_ settings pointing at it."""
    from ue_pilot.sandbox.runner import build_parser, serve

    args = ["--orgs", str(orgs)]
    if storage:
        args.append("--storage")
    for name in faults:
        args += ["--fault", name]
    sys.exit(serve(build_parser().parse_args(args)))


if __name__ == "__main__":
    main()
