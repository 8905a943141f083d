"""Throwaway PostgreSQL databases shaped like a Union-Eyes deployment.

Each `SandboxDatabase` is a database `ue_sbx_<8 hex>` with three roles:

- `<db>_owner` (NOLOGIN) owns the tables, so row-level security applies to
  everyone else, and FORCE applies it to the owner too.
- `<db>_app` is the login the web application uses. It has no BYPASSRLS.
- `<db>_audit` is a NOINHERIT login without table privileges of its own. It
  reads rows only after `SET ROLE <db>_app` inside a READ ONLY transaction, so it
  reads exactly the rows the application reads. Its sessions default to read-only.

Database faults (see `faults.py`) are applied after seeding, and
`export-formula-cells` also to orgs that `add_org` adds later. The database and
each role carry a comment naming the creating process, so `drop_leftovers` can
remove what a killed run left behind.

`add_bulk_rewards` adds many reward rows to one org, for export benchmarks.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ue_pilot.orgids import validate_org_id
from ue_pilot.sandbox.faults import validate_faults

__all__ = [
    "BULK_ROW_CSV_BYTES",
    "DEFAULT_ADMIN_URL",
    "FORMULA_DESCRIPTIONS",
    "SandboxDatabase",
    "bulk_reward_csv_bytes",
    "drop_leftovers",
]

logger = logging.getLogger(__name__)

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
NAME_PREFIX = "ue_sbx_"
TENANT_TABLES = ("members", "rewards", "tax_slips")
MEMBERS_PER_ORG = 20
REWARDS_PER_ORG = 50
TAX_SLIPS_PER_ORG = 20

# Reward descriptions that a spreadsheet program may run as formulas when it
# opens the CSV file, because they start with =, +, -, @, tab or CR. Fault
# export-formula-cells writes them to each org's first six rewards.
FORMULA_DESCRIPTIONS = (
    '=HYPERLINK("https://example.invalid/claim","Claim reward")',
    "+1 613 555 0100 steward hotline",
    "-15 points correction",
    "@SUM(A1:A10)",
    "\tIndented note from the steward",
    "\rCarriage return before the note",
)

# The target size of one bulk reward row in the CSV export, in bytes.
BULK_ROW_CSV_BYTES = 100
BULK_ID_DIGITS = 10
BULK_MIN_DESCRIPTION = 16
# The CSV bytes of a bulk row besides its description and the org id that
# starts three of its columns. They are the id suffix `:b` and its digits,
# `:mNN` of the member id, 3 digits of points, a 20-character UTC timestamp,
# 5 commas and CRLF.
_BULK_FIXED_BYTES = 2 + BULK_ID_DIGITS + 4 + 3 + 20 + 5 + 2

_DATABASE_NAME = re.compile(r"^ue_sbx_[0-9a-f]{8}$")
_ROLE_NAME = re.compile(r"^(ue_sbx_[0-9a-f]{8})_(?:owner|app|audit)$")
_MARKER = re.compile(r"pid=(\d+) start=(\d*) host=(\S+)")
_TENANT_SETTING = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")

_SCHEMA = """
CREATE TABLE organizations (
    id text PRIMARY KEY,
    name text NOT NULL,
    status text NOT NULL DEFAULT 'active'
);
CREATE TABLE members (
    id text PRIMARY KEY,
    org_id text NOT NULL REFERENCES organizations (id),
    full_name text NOT NULL,
    email text NOT NULL,
    role text NOT NULL
);
CREATE TABLE rewards (
    id text PRIMARY KEY,
    org_id text NOT NULL REFERENCES organizations (id),
    member_id text NOT NULL REFERENCES members (id),
    points int NOT NULL,
    description text NOT NULL,
    awarded_at timestamptz NOT NULL
);
CREATE TABLE tax_slips (
    id text PRIMARY KEY,
    org_id text NOT NULL REFERENCES organizations (id),
    member_id text NOT NULL REFERENCES members (id),
    tax_year int NOT NULL,
    slip_type text NOT NULL DEFAULT 'T4A',
    amount numeric(12, 2) NOT NULL,
    sin_last3 text NOT NULL
);
CREATE VIEW member_rewards WITH (security_invoker = true) AS
SELECT r.id AS reward_id, r.org_id, m.id AS member_id, m.full_name,
       r.points, r.description, r.awarded_at
FROM rewards AS r
JOIN members AS m ON m.id = r.member_id;
"""

# Seeds are a function of the org id alone (hashtext is stable within a
# PostgreSQL major version), so `add_org` produces the same rows as `create`.
# Parameters allow one statement per execute, hence a tuple.
_SEED = (
    """
    INSERT INTO organizations (id, name, status)
    SELECT o, 'Union Local ' || (1000 + mod(abs(hashtext(o)), 9000)), 'active'
    FROM unnest(%(orgs)s::text[]) AS o
    """,
    """
    INSERT INTO members (id, org_id, full_name, email, role)
    SELECT o || ':m' || lpad(n::text, 2, '0'), o,
           (ARRAY['Alex', 'Sam', 'Priya', 'Jordan', 'Marie', 'Wei', 'Omar', 'Lena'])
               [1 + mod(abs(hashtext(o || ':f' || n)), 8)]
           || ' ' ||
           (ARRAY['Tremblay', 'Singh', 'Roy', 'Nguyen', 'Martin', 'Okafor', 'Chen'])
               [1 + mod(abs(hashtext(o || ':l' || n)), 7)],
           'member' || n || '@' || lower(o) || '.example.org',
           CASE WHEN n = 1 THEN 'owner' WHEN n <= 3 THEN 'admin' ELSE 'member' END
    FROM unnest(%(orgs)s::text[]) AS o, generate_series(1, %(members)s) AS n
    """,
    """
    INSERT INTO rewards (id, org_id, member_id, points, description, awarded_at)
    SELECT o || ':r' || lpad(n::text, 3, '0'), o,
           o || ':m' || lpad((1 + mod(n - 1, %(members)s))::text, 2, '0'),
           10 + mod(abs(hashtext(o || ':p' || n)), 490),
           (ARRAY['Meeting attendance', 'Steward training', 'Picket duty',
                  'Member referral', 'Committee work'])[1 + mod(n, 5)],
           timestamptz '2025-01-01 00:00+00' + n * interval '3 days'
               + mod(abs(hashtext(o)), 1440) * interval '1 minute'
    FROM unnest(%(orgs)s::text[]) AS o, generate_series(1, %(rewards)s) AS n
    """,
    """
    INSERT INTO tax_slips (id, org_id, member_id, tax_year, amount, sin_last3)
    SELECT o || ':t' || lpad(n::text, 2, '0'), o,
           o || ':m' || lpad((1 + mod(n - 1, %(members)s))::text, 2, '0'),
           2023 + mod(n, 3),
           round(100 + mod(abs(hashtext(o || ':a' || n)), 500000) / 100.0, 2),
           lpad(mod(abs(hashtext(o || ':s' || n)), 1000)::text, 3, '0')
    FROM unnest(%(orgs)s::text[]) AS o, generate_series(1, %(tax_slips)s) AS n
    """,
)

_FORMULA_CELLS = """
UPDATE rewards AS r SET description = (%(values)s::text[])[n]
FROM unnest(%(orgs)s::text[]) AS o,
     generate_series(1, cardinality(%(values)s::text[])) AS n
WHERE r.id = o || ':r' || lpad(n::text, 3, '0')
"""

# Bulk rows get ids `<org>:b<10 digits>`, numbered on from the org's highest
# bulk id, so they never collide with seeded ids (`:r`) or earlier bulk rows.
# Points have 3 digits and timestamps whole seconds, so every bulk row of one
# org has the same CSV length.
_BULK_REWARDS = """
INSERT INTO rewards (id, org_id, member_id, points, description, awarded_at)
SELECT %(prefix)s || lpad(n::text, %(digits)s, '0'), %(org)s,
       %(org)s || ':m' || lpad((1 + mod(n - 1, %(members)s))::text, 2, '0'),
       100 + mod(n, 900),
       rpad('Reward ' || n, %(width)s, ' for steward training and picket duty'),
       timestamptz '2025-01-01 00:00+00' + n * interval '1 second'
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS n
"""


@dataclass
class SandboxDatabase:
    """A seeded database and its owner, app and audit roles on one server."""

    name: str
    admin_url: str
    app_url: str
    audit_url: str
    owner_role: str
    app_role: str
    audit_role: str
    tenant_setting: str
    faults: frozenset[str]
    org_ids: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def create(
        cls,
        admin_url: str = DEFAULT_ADMIN_URL,
        *,
        org_ids: list[str],
        faults: set[str],
        tenant_setting: str = "app.org_id",
    ) -> SandboxDatabase:
        """Create the roles and database, build the schema, seed it, apply faults.

        `admin_url` must connect as a superuser, because seeding relies on
        bypassing row-level security and the setup changes table owners. On
        any failure the partly built database and roles are dropped before the
        error propagates.
        """
        validate_faults(sorted(faults))
        validate_tenant_setting(tenant_setting)
        orgs = validate_org_list(org_ids)
        name = NAME_PREFIX + secrets.token_hex(4)
        database = cls.describe(name, admin_url, tenant_setting, frozenset(faults))
        try:
            database._create_roles_and_database()
            database._build(orgs)
        except BaseException:
            database.drop()
            raise
        logger.info(
            "created sandbox database %s with %d orgs", database.name, len(orgs)
        )
        return database

    @classmethod
    def describe(
        cls,
        name: str,
        admin_url: str = DEFAULT_ADMIN_URL,
        tenant_setting: str = "app.org_id",
        faults: frozenset[str] = frozenset(),
    ) -> SandboxDatabase:
        """Return the handle of sandbox `name` without touching the server.

        `org_ids` starts empty. `drop_leftovers` uses it to drop a sandbox
        that another process created.
        """
        return cls(
            name=name,
            admin_url=admin_url,
            app_url=role_url(admin_url, f"{name}_app", name),
            audit_url=role_url(admin_url, f"{name}_audit", name),
            owner_role=f"{name}_owner",
            app_role=f"{name}_app",
            audit_role=f"{name}_audit",
            tenant_setting=tenant_setting,
            faults=faults,
        )

    @property
    def database_admin_url(self) -> str:
        """Connection string of the admin login, pointed at this database."""
        return make_conninfo(self.admin_url, dbname=self.name)

    def add_org(self, org_id: str) -> None:
        """Insert one more organization with the same seed rows as `create` makes.

        Raises ValueError when the org id is invalid or already seeded.
        """
        validate_org_id(org_id)
        if org_id in self.org_ids:
            raise ValueError(f"org {org_id!r} is already seeded in {self.name}")
        with psycopg.connect(self.database_admin_url) as conn:
            for statement in _SEED:
                conn.execute(statement, _seed_parameters([org_id]))
            self._apply_data_faults(conn, [org_id])
        self.org_ids.append(org_id)

    def add_bulk_rewards(self, org_id: str, rows: int) -> None:
        """Insert `rows` more reward rows for one seeded org in one statement.

        Each row takes `bulk_reward_csv_bytes(org_id)` bytes of the CSV export,
        100 for org ids of up to 14 characters, so 1,000,000 rows make about a
        100 MB export. Raises ValueError when `rows` is not positive or the org
        is not seeded in this database.
        """
        validate_org_id(org_id)
        if rows < 1:
            raise ValueError(f"invalid row count {rows}: expected at least 1")
        prefix = f"{org_id}:b"
        with psycopg.connect(self.database_admin_url) as conn:
            self._check_seeded(conn, org_id)
            highest = conn.execute(
                "SELECT max(id) FROM rewards WHERE org_id = %s AND starts_with(id, %s)",
                (org_id, prefix),
            ).fetchone()
            done = int(highest[0][len(prefix) :]) if highest and highest[0] else 0
            first, last = done + 1, done + rows
            if len(str(last)) > BULK_ID_DIGITS:
                raise ValueError(
                    f"invalid row count {rows}: org {org_id!r} would have more "
                    f"than {10**BULK_ID_DIGITS - 1} bulk rows; add fewer rows"
                )
            # The rows reference seeded members only, so skipping the foreign
            # key triggers (superuser only) loses no check. It cut 1,000,000
            # rows from about 12 s to 3 s on 2 cores.
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute(
                _BULK_REWARDS,
                {
                    "prefix": prefix,
                    "org": org_id,
                    "digits": BULK_ID_DIGITS,
                    "members": MEMBERS_PER_ORG,
                    "width": _bulk_description_width(org_id),
                    "first": first,
                    "last": last,
                },
            )
        # ANALYZE updates the row estimates the planner uses for export queries.
        with psycopg.connect(self.database_admin_url, autocommit=True) as conn:
            conn.execute("ANALYZE rewards")
        logger.info("added %d bulk rewards for %s in %s", rows, org_id, self.name)

    def _check_seeded(self, conn: psycopg.Connection, org_id: str) -> None:
        row = conn.execute(
            "SELECT count(*) FROM members WHERE org_id = %s", (org_id,)
        ).fetchone()
        if not row or row[0] < MEMBERS_PER_ORG:
            raise ValueError(
                f"org {org_id!r} is not seeded in {self.name}; create the database "
                "with it or call add_org first"
            )

    def drop(self) -> None:
        """Terminate every session of the database and its roles, then drop them.

        Running it again, or on a half-created sandbox, is harmless.
        """
        roles = [self.owner_role, self.app_role, self.audit_role]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s OR usename = ANY(%s)",
                (self.name, roles),
            )
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(self.name)
                )
            )
            for role in roles:
                conn.execute(
                    sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role))
                )
        logger.info("dropped sandbox database %s and its roles", self.name)

    def _create_roles_and_database(self) -> None:
        marker = sql.Literal(process_marker())
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for statement in self._role_statements():
                conn.execute(statement)
            for role in (self.owner_role, self.app_role, self.audit_role):
                conn.execute(
                    sql.SQL("COMMENT ON ROLE {} IS {}").format(
                        sql.Identifier(role), marker
                    )
                )
            for statement in self._database_statements():
                conn.execute(statement)
            conn.execute(
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                    sql.Identifier(self.name), marker
                )
            )

    def _role_statements(self) -> list[sql.Composed]:
        owner = sql.Identifier(self.owner_role)
        app = sql.Identifier(self.app_role)
        audit = sql.Identifier(self.audit_role)
        return [
            sql.SQL("CREATE ROLE {} NOLOGIN").format(owner),
            sql.SQL(
                "CREATE ROLE {} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE"
            ).format(app),
            sql.SQL(
                "CREATE ROLE {} LOGIN NOINHERIT NOSUPERUSER NOBYPASSRLS"
                " NOCREATEDB NOCREATEROLE"
            ).format(audit),
            sql.SQL("GRANT {} TO {}").format(app, audit),
            # NOTE: before PostgreSQL 16 a NOINHERIT role uses a membership only
            # after SET ROLE, so pg_read_all_stats needs SET ROLE pg_read_all_stats.
            sql.SQL("GRANT pg_read_all_stats TO {}").format(audit),
            sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(
                audit
            ),
        ]

    def _database_statements(self) -> list[sql.Composed]:
        database = sql.Identifier(self.name)
        return [
            sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0").format(
                database, sql.Identifier(self.owner_role)
            ),
            sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(database),
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}, {}").format(
                database,
                sql.Identifier(self.app_role),
                sql.Identifier(self.audit_role),
            ),
        ]

    def _build(self, orgs: list[str]) -> None:
        with psycopg.connect(self.database_admin_url) as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(self.owner_role)))
            conn.execute(_SCHEMA)
            for table in TENANT_TABLES:
                for statement in tenant_policy_statements(table, self.tenant_setting):
                    conn.execute(statement)
            conn.execute(self._grant_statement())
            conn.execute("RESET ROLE")

            # The admin login is a superuser, which bypasses row-level security.
            for statement in _SEED:
                conn.execute(statement, _seed_parameters(orgs))
            for table in TENANT_TABLES:
                conn.execute(
                    sql.SQL("CREATE INDEX ON {} (org_id)").format(sql.Identifier(table))
                )
            for statement in self._fault_statements():
                conn.execute(statement)
            self._apply_data_faults(conn, orgs)
        self.org_ids.extend(orgs)

        # ANALYZE cannot run inside the transaction block above.
        with psycopg.connect(self.database_admin_url, autocommit=True) as conn:
            conn.execute("ANALYZE")

    def _grant_statement(self) -> sql.Composed:
        tables = sql.SQL(", ").join(
            sql.Identifier(name) for name in ("organizations", *TENANT_TABLES)
        )
        app = sql.Identifier(self.app_role)
        return sql.SQL(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON {tables} TO {app};"
            " GRANT SELECT ON member_rewards TO {app}"
        ).format(tables=tables, app=app)

    def _apply_data_faults(self, conn: psycopg.Connection, orgs: list[str]) -> None:
        """Apply the data faults to the seeded rows of `orgs`."""
        if "export-formula-cells" in self.faults:
            conn.execute(
                _FORMULA_CELLS, {"orgs": orgs, "values": list(FORMULA_DESCRIPTIONS)}
            )

    def _fault_statements(self) -> list[sql.Composable]:
        statements: list[sql.Composable] = []
        if "rls-disabled" in self.faults:
            statements.append(
                sql.SQL("ALTER TABLE tax_slips DISABLE ROW LEVEL SECURITY")
            )
        if "rls-not-forced" in self.faults:
            statements.append(
                sql.SQL("ALTER TABLE rewards OWNER TO {}").format(
                    sql.Identifier(self.app_role)
                )
            )
            statements.append(
                sql.SQL("ALTER TABLE rewards NO FORCE ROW LEVEL SECURITY")
            )
        if "rls-fail-open" in self.faults:
            statements.append(
                sql.SQL(
                    "CREATE POLICY members_fail_open ON members AS PERMISSIVE"
                    " FOR SELECT"
                    " USING (coalesce(current_setting({}, true), '') = '')"
                ).format(sql.Literal(self.tenant_setting))
            )
        return statements


def tenant_policy_statements(table: str, tenant_setting: str) -> list[sql.Composed]:
    """Build the statements that enable, force and define row-level security.

    The four policies, one per command, compare `org_id` with the tenant setting
    read with `missing_ok`, so a query without context returns no rows.
    """
    clauses = {
        "select": "USING ({check})",
        "insert": "WITH CHECK ({check})",
        "update": "USING ({check}) WITH CHECK ({check})",
        "delete": "USING ({check})",
    }
    check = sql.SQL("org_id = current_setting({}, true)").format(
        sql.Literal(tenant_setting)
    )
    table_name = sql.Identifier(table)
    statements = [
        sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(table_name),
        sql.SQL("ALTER TABLE {} FORCE ROW LEVEL SECURITY").format(table_name),
    ]
    for command, clause in clauses.items():
        template = "CREATE POLICY {policy} ON {table} FOR " + command.upper() + " "
        statements.append(
            sql.SQL(template + clause).format(
                policy=sql.Identifier(f"{table}_tenant_{command}"),
                table=table_name,
                check=check,
            )
        )
    return statements


def bulk_reward_csv_bytes(org_id: str) -> int:
    """Return the CSV length in bytes, CRLF included, of one bulk reward of `org_id`."""
    return 3 * len(org_id) + _BULK_FIXED_BYTES + _bulk_description_width(org_id)


def _bulk_description_width(org_id: str) -> int:
    width = BULK_ROW_CSV_BYTES - 3 * len(org_id) - _BULK_FIXED_BYTES
    return max(BULK_MIN_DESCRIPTION, width)


def validate_tenant_setting(name: str) -> str:
    """Return `name` if it is a custom setting name such as `app.org_id`.

    PostgreSQL accepts only dotted names for settings it does not define itself.
    """
    if not _TENANT_SETTING.fullmatch(name):
        raise ValueError(
            f"invalid tenant setting {name!r}: expected a dotted custom setting "
            "name such as app.org_id"
        )
    return name


def validate_org_list(org_ids: list[str]) -> list[str]:
    """Return a copy of the org ids, raising ValueError for a bad or repeated id."""
    orgs = [validate_org_id(org_id) for org_id in org_ids]
    if len(set(orgs)) != len(orgs):
        raise ValueError("org_ids contains duplicates; pass each org id once")
    return orgs


def role_url(admin_url: str, role: str, database: str) -> str:
    """Build a password-less URL for `role` on the admin URL's host and port."""
    params = conninfo_to_dict(admin_url)
    host = params.get("host") or "127.0.0.1"
    port = params.get("port") or "5432"
    return f"postgresql://{role}@{host}:{port}/{database}"


def process_marker() -> str:
    """Return a comment identifying the current process by pid, start time and host."""
    pid = os.getpid()
    return (
        f"ue-pilot sandbox pid={pid} start={_process_start(pid) or ''} "
        f"host={socket.gethostname()}"
    )


def drop_leftovers(admin_url: str = DEFAULT_ADMIN_URL) -> list[str]:
    """Drop the sandbox databases and roles whose creating process has exited.

    Only names of the form `ue_sbx_<8 hex>` created on this host are considered.
    A sandbox whose database and roles all lack a process comment is kept.
    Returns the dropped database names (the prefix, for role-only leftovers).
    """
    markers = _collect_markers(admin_url)
    dropped = []
    for name, marker in sorted(markers.items()):
        if marker is None or not _is_orphaned(marker):
            continue
        SandboxDatabase.describe(name, admin_url).drop()
        dropped.append(name)
    return dropped


def _collect_markers(admin_url: str) -> dict[str, str | None]:
    """Map each sandbox name found on the server to one of its process comments."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database"
            " WHERE datname LIKE 'ue\\_sbx\\_%'"
            " UNION ALL"
            " SELECT rolname, shobj_description(oid, 'pg_authid') FROM pg_roles"
            " WHERE rolname LIKE 'ue\\_sbx\\_%'"
        ).fetchall()
    markers: dict[str, str | None] = {}
    for object_name, comment in rows:
        name = _sandbox_name(object_name)
        if name is None:
            continue
        if markers.get(name) is None:
            markers[name] = comment
    return markers


def _sandbox_name(object_name: str) -> str | None:
    if _DATABASE_NAME.fullmatch(object_name):
        return object_name
    match = _ROLE_NAME.fullmatch(object_name)
    return match.group(1) if match else None


def _is_orphaned(comment: str) -> bool:
    match = _MARKER.search(comment)
    if match is None:
        return False
    pid, start, host = int(match.group(1)), match.group(2), match.group(3)
    if host != socket.gethostname():
        return False
    return not _process_alive(pid, start)


def _process_alive(pid: int, start: str) -> bool:
    """Return whether `pid` is running and, if `start` is known, the same process."""
    current_start = _process_start(pid)
    if current_start is not None:
        return not start or current_start == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # No /proc entry but the signal test passed: no start time to compare.
    return not os.path.isdir("/proc")


def _process_start(pid: int) -> str | None:
    """Read the start time of `pid` in clock ticks from /proc, if available.

    Together with the pid it identifies a process even after pid reuse.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            text = stat.read()
    except OSError:
        return None

    # Field 22 (starttime), counted after the parenthesised command name.
    return text.rsplit(")", 1)[1].split()[19]


def _seed_parameters(orgs: list[str]) -> dict[str, object]:
    return {
        "orgs": orgs,
        "members": MEMBERS_PER_ORG,
        "rewards": REWARDS_PER_ORG,
        "tax_slips": TAX_SLIPS_PER_ORG,
    }
