"""PostgreSQL seed scripts of a new org (runbook onboarding step 3, "Seed
required data: run any org-specific migration scripts").

Each script runs in its own transaction as the application role
(`UE_DB_APP_ROLE`), with the tenant setting set transaction-locally to the new
org, so row-level security judges every row it writes. The same transaction
records the script in `ue_pilot.seed_log` (org, script, sha256, applied_at),
so a script is either applied and recorded or neither, and a re-run skips it.
A recorded script whose content changed fails the step: it is never run twice.

Scripts read the new org from the tenant setting or from `ue_pilot.org_id`,
and its name and slug from `ue_pilot.org_name` and `ue_pilot.org_slug`, all
set for the transaction only.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from psycopg import sql

from tasks.database import describe_error
from ue_pilot.checks import CheckResult, failed, inconclusive, passed
from ue_pilot.settings import Settings

CHECK_ID = "onboarding.seed_scripts"
SCRIPT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.sql$")
MAX_SCRIPT_BYTES = 10 * 1024 * 1024

# The seed log lives in its own schema, outside UE_DB_SCHEMAS, so the audit's
# tenant-table checks do not take it for tenant data.
SEED_LOG_DDL = """
CREATE SCHEMA IF NOT EXISTS ue_pilot;
CREATE TABLE IF NOT EXISTS ue_pilot.seed_log (
    org_id text NOT NULL,
    script text NOT NULL,
    sha256 text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    flow_run_id text NOT NULL,
    PRIMARY KEY (org_id, script)
)
"""


class SeedFolderError(ValueError):
    """The seed folder is missing, empty, or contains files other than scripts."""


class SeedScriptError(RuntimeError):
    """A script failed, was rejected, or changed since it was applied."""


class SeedLogError(RuntimeError):
    """The seed log does not exist and the seed role may not create it."""


@dataclass(frozen=True)
class SeedScript:
    """One seed script: its file name, its text and the sha256 of its bytes."""

    name: str
    text: str
    sha256: str


def load_seed_scripts(folder: str | Path) -> list[SeedScript]:
    """Read every script of `folder` in name order, rejecting anything else there.

    The folder must exist and contain only `*.sql` files, at least one, each
    UTF-8 text of at most MAX_SCRIPT_BYTES bytes.
    """
    path = Path(folder)
    if not str(folder) or not path.is_dir():
        raise SeedFolderError(
            f"seed folder {str(folder)!r} not found; pass --seeds DIR or set "
            "UE_SEED_SCRIPTS_DIR to the folder of the org's *.sql scripts"
        )
    entries = sorted(path.iterdir(), key=lambda entry: entry.name)
    strays = [
        entry.name for entry in entries
        if not entry.is_file() or not SCRIPT_NAME.match(entry.name)
    ]
    if strays:
        raise SeedFolderError(
            f"seed folder {str(path)!r} contains {strays[:5]}, which are not seed "
            "scripts; keep only *.sql files named with letters, digits, '.', '_' "
            "and '-' there"
        )
    if not entries:
        raise SeedFolderError(
            f"seed folder {str(path)!r} contains no *.sql script; onboarding needs "
            "the org's seed data to prove row-level security on it"
        )
    return [read_script(entry) for entry in entries]


def read_script(path: Path) -> SeedScript:
    data = path.read_bytes()
    if len(data) > MAX_SCRIPT_BYTES:
        raise SeedFolderError(
            f"seed script {path.name!r} has {len(data)} bytes; the maximum is "
            f"{MAX_SCRIPT_BYTES}"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SeedFolderError(
            f"seed script {path.name!r} is not UTF-8 text (byte {error.start})"
        ) from None
    return SeedScript(path.name, text, hashlib.sha256(data).hexdigest())


@task(name="run-seed-scripts", cache_policy=NO_CACHE)
def run_seed_scripts(
    settings: Settings,
    org: dict,
    scripts: list[SeedScript],
    flow_run_id: str,
) -> CheckResult:
    """Apply the scripts not yet recorded for the org, in order, and prove each one.

    Stops at the first script that fails, is rejected by row-level security,
    or changed since it was applied; the scripts after it are not run.
    """
    logger = get_run_logger()
    org_id = org["org"]
    if not settings.seed_database_url.get_secret_value():
        return inconclusive(
            CHECK_ID, "UE_SEED_DATABASE_URL is not set: no connection to seed with",
            org_id,
        )
    outcome: dict[str, list] = {"applied": [], "skipped": [], "not_run": []}
    try:
        with psycopg.connect(
            settings.seed_database_url.get_secret_value(),
            connect_timeout=10,
            application_name="ue-pilot-onboarding",
        ) as conn:
            ensure_seed_log(conn)
            for script in scripts:
                applied = apply_script(conn, settings, org, script, flow_run_id)
                outcome["applied" if applied else "skipped"].append(script.name)
    except SeedScriptError as error:
        done = len(outcome["applied"]) + len(outcome["skipped"])
        outcome["not_run"] = [s.name for s in scripts[done + 1:]]
        logger.error("seed script %s of %s: %s", scripts[done].name, org_id, error)
        return failed(CHECK_ID, str(error), org_id, failed=scripts[done].name,
                      **outcome)
    except SeedLogError as error:
        return inconclusive(CHECK_ID, str(error), org_id, **outcome)
    except psycopg.Error as error:
        return inconclusive(
            CHECK_ID, f"seed database unreachable: {describe_error(error)}", org_id,
            **outcome,
        )
    logger.info("seed scripts of %s: %d applied, %d skipped", org_id,
                len(outcome["applied"]), len(outcome["skipped"]))
    return passed(
        CHECK_ID,
        f"{len(outcome['applied'])} script(s) applied, "
        f"{len(outcome['skipped'])} already applied",
        org_id,
        **outcome,
    )


def ensure_seed_log(conn: psycopg.Connection) -> None:
    """Create the seed log unless it exists, with a clear error when not allowed."""
    with conn.transaction():
        found = conn.execute("SELECT to_regclass('ue_pilot.seed_log')").fetchone()
    if found and found[0]:
        return
    try:
        with conn.transaction():
            conn.execute(SEED_LOG_DDL)
    except psycopg.errors.InsufficientPrivilege as error:
        raise SeedLogError(
            f"the seed log ue_pilot.seed_log does not exist and the seed role may "
            f"not create it ({describe_error(error)}); create it once as the "
            f"database owner:{SEED_LOG_DDL}and grant USAGE on schema ue_pilot and "
            "SELECT, INSERT on it to the seed role"
        ) from None


def apply_script(
    conn: psycopg.Connection,
    settings: Settings,
    org: dict,
    script: SeedScript,
    flow_run_id: str,
) -> bool:
    """Run one script in one transaction and record it; False if already applied.

    An advisory lock on the org serializes two onboarding runs of the same org,
    and the log's primary key would reject a second record anyway.
    """
    org_id = org["org"]
    try:
        with conn.transaction():
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                (f"ue_pilot.seed:{org_id}",),
            )
            if already_applied(conn, org_id, script):
                return False
            enter_tenant_context(conn, settings, org)
            conn.execute(script.text)
            check_context_kept(conn, settings, org_id, script)
            conn.execute("RESET ROLE")
            conn.execute(
                "INSERT INTO ue_pilot.seed_log (org_id, script, sha256, flow_run_id)"
                " VALUES (%s, %s, %s, %s)",
                (org_id, script.name, script.sha256, flow_run_id),
            )
    except psycopg.errors.InsufficientPrivilege as error:
        if "row-level security" in str(error):
            raise SeedScriptError(
                f"script {script.name} was rejected by row-level security, so it "
                f"writes rows of another org: {describe_error(error)}"
            ) from None
        raise SeedScriptError(
            f"script {script.name} failed: {describe_error(error)}"
        ) from None
    except (psycopg.OperationalError, psycopg.InterfaceError):
        # A lost connection proves nothing about the script: inconclusive.
        raise
    except psycopg.Error as error:
        raise SeedScriptError(
            f"script {script.name} failed: {describe_error(error)}"
        ) from None
    return True


def already_applied(
    conn: psycopg.Connection, org_id: str, script: SeedScript
) -> bool:
    """Return True when the script is recorded with the same content, else raise."""
    row = conn.execute(
        "SELECT sha256, applied_at FROM ue_pilot.seed_log"
        " WHERE org_id = %s AND script = %s",
        (org_id, script.name),
    ).fetchone()
    if row is None:
        return False
    if row[0] != script.sha256:
        raise SeedScriptError(
            f"script {script.name} changed since it was applied at "
            f"{row[1].isoformat()} (sha256 {row[0][:12]}... now "
            f"{script.sha256[:12]}...); applied scripts never run again, so "
            "restore it and put the change in a new script"
        )
    return True


def enter_tenant_context(
    conn: psycopg.Connection, settings: Settings, org: dict
) -> None:
    """Act as the application role in the org's tenant context, for this transaction."""
    conn.execute(
        sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(settings.db_app_role))
    )
    conn.execute(
        "SELECT set_config(%s, %s, true), set_config('ue_pilot.org_id', %s, true),"
        " set_config('ue_pilot.org_name', %s, true),"
        " set_config('ue_pilot.org_slug', %s, true)",
        (settings.tenant_setting, org["org"], org["org"], org["name"], org["slug"]),
    )


def check_context_kept(
    conn: psycopg.Connection, settings: Settings, org_id: str, script: SeedScript
) -> None:
    """Raise when the script left the app role, the org's context or the transaction.

    NOTE: a seed role above the app role could switch roles and back inside a
    script without this check noticing. Connecting as the app role itself, as
    the sandbox does, rules that out.
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS:
        raise SeedScriptError(
            f"script {script.name} ended the transaction; remove BEGIN, COMMIT "
            "and ROLLBACK, because each script runs in one transaction"
        )
    role, context = conn.execute(
        "SELECT current_user, current_setting(%s, true)", (settings.tenant_setting,)
    ).fetchone()
    if role != settings.db_app_role or context != org_id:
        raise SeedScriptError(
            f"script {script.name} changed the role to {role!r} or the tenant "
            f"context to {context!r}; seed scripts must not change either"
        )
