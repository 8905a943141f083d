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
    """Stop Prefect from sending analytics; must run before prefect is imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT", "false")


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
            code = run_audit(list(orgs), as_json)
        sys.exit(code)
    except KeyboardInterrupt:
        click.echo("Interrupted: the audit did not finish.", err=True)
        sys.exit(EXIT_INTERRUPTED)


def run_audit(orgs: list[str], as_json: bool) -> int:
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
        click.echo(render_summary(result))
    return EXIT_CODES[result["verdict"]]


def render_summary(result: dict) -> str:
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
@fault_option
def sandbox_up(orgs: int, faults: tuple[str, ...]) -> None:
    """Run the sandbox in the foreground and print the UE_ settings pointing at it."""
    from ue_pilot.sandbox.runner import build_parser, serve

    args = ["--orgs", str(orgs)]
    for name in faults:
        args += ["--fault", name]
    sys.exit(serve(build_parser().parse_args(args)))


if __name__ == "__main__":
    main()
