"""PostgreSQL checks: connection headroom, row-level security posture and the
tenant context (runbook step 2, "Verify RLS is active for the pilot org").

The audit connects as a read-only role. To read exactly the rows the
application reads, it switches to the application role (`SET LOCAL ROLE`)
inside READ ONLY transactions. That needs the audit role to be a member of
the application role. Without that membership the behavioural checks are inconclusive.
"""

from __future__ import annotations

import psycopg
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from psycopg import sql
from psycopg_pool import ConnectionPool

from ue_pilot.checks import CheckResult, failed, inconclusive, passed
from ue_pilot.clients import connect_database
from ue_pilot.settings import Settings

TENANT_TABLES_SQL = """
SELECT c.oid, n.nspname, c.relname, c.relrowsecurity, c.relforcerowsecurity,
       pg_get_userbyid(c.relowner) AS owner
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'p') AND a.attname = %(column)s
  AND n.nspname = ANY(%(schemas)s)
ORDER BY n.nspname, c.relname
"""

POLICIES_SQL = """
SELECT polrelid, polname, polpermissive, polcmd,
       pg_get_expr(polqual, polrelid) AS using_expr,
       pg_get_expr(polwithcheck, polrelid) AS check_expr
FROM pg_policy WHERE polrelid = ANY(%(oids)s)
"""

# Views and materialized views that read a tenant table through their rewrite
# rule. A materialized view stores a copy of the rows, which row-level security
# on the table no longer filters.
VIEWS_SQL = """
SELECT DISTINCT v.relname AS view, n.nspname AS schema, t.relname AS tenant_table,
       coalesce(v.reloptions::text[], '{}') AS options, v.relkind AS kind
FROM pg_rewrite r
JOIN pg_class v ON v.oid = r.ev_class AND v.relkind IN ('v', 'm')
JOIN pg_namespace n ON n.oid = v.relnamespace
JOIN pg_depend d ON d.objid = r.oid AND d.classid = 'pg_rewrite'::regclass
JOIN pg_class t ON t.oid = d.refobjid
WHERE t.oid = ANY(%(oids)s) AND v.oid <> t.oid
"""

ROLE_SQL = """
SELECT r.rolname, r.rolsuper, r.rolbypassrls
FROM pg_roles r
WHERE pg_has_role(%(role)s, r.oid, 'MEMBER')
"""

DEFAULTS_SQL = """
SELECT coalesce(pg_get_userbyid(s.setrole), '') AS role,
       coalesce(d.datname, '') AS database, s.setconfig
FROM pg_db_role_setting s LEFT JOIN pg_database d ON d.oid = s.setdatabase
WHERE (s.setrole = 0 OR pg_has_role(%(role)s, s.setrole, 'MEMBER'))
  AND (s.setdatabase = 0 OR d.datname = current_database())
"""

ALWAYS_TRUE = {"true", "(true)", "1 = 1", "(1 = 1)"}


@task(
    name="check-db-connections",
    retries=2,
    retry_delay_seconds=[5, 15],
    cache_policy=NO_CACHE,
)
def check_db_connections(settings: Settings) -> CheckResult:
    """Compare open connections with max_connections (runbook: pool saturation)."""
    check_id = "health.db_connections"
    try:
        with connect_database(settings) as conn:
            used = conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone()[0]
            limit = int(conn.execute("SHOW max_connections").fetchone()[0])
    except psycopg.Error as error:
        return failed(check_id, f"database unreachable: {describe_error(error)}")
    ratio = used / limit
    observed = {
        "connections": used,
        "max_connections": limit,
        "ratio": round(ratio, 3),
        "threshold": settings.db_connections_max_ratio,
    }
    if ratio > settings.db_connections_max_ratio:
        return failed(check_id, f"{used} of {limit} connections in use", **observed)
    return passed(check_id, f"{used} of {limit} connections in use", **observed)


def describe_error(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:300]}"


def switch_to_app_role(conn: psycopg.Connection, settings: Settings) -> None:
    """Start a READ ONLY transaction acting as the application role."""
    conn.execute("SET TRANSACTION READ ONLY")
    conn.execute(
        sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(settings.db_app_role))
    )


@task(
    name="inspect-rls-posture",
    retries=2,
    retry_delay_seconds=[5, 15],
    cache_policy=NO_CACHE,
)
def inspect_rls_posture(settings: Settings) -> list[CheckResult]:
    """Read the catalog: RLS on every tenant table, policies, views, the app role."""
    logger = get_run_logger()
    try:
        with connect_database(settings) as conn:
            tables = conn.execute(
                TENANT_TABLES_SQL,
                {
                    "column": settings.db_org_column,
                    "schemas": settings.db_schemas,
                },
            ).fetchall()
            oids = [row[0] for row in tables]
            policies = conn.execute(POLICIES_SQL, {"oids": oids}).fetchall()
            views = conn.execute(VIEWS_SQL, {"oids": oids}).fetchall()
            roles = conn.execute(ROLE_SQL, {"role": settings.db_app_role}).fetchall()
            defaults = conn.execute(
                DEFAULTS_SQL, {"role": settings.db_app_role}
            ).fetchall()
    except psycopg.Error as error:
        problem = f"catalog query failed: {describe_error(error)}"
        return [inconclusive(check_id, problem) for check_id in POSTURE_CHECKS]

    logger.info(
        "rls: %d tenant tables, %d policies, %d views",
        len(tables),
        len(policies),
        len(views),
    )
    if not tables:
        return [
            inconclusive(
                check_id,
                f"no table has a {settings.db_org_column!r} "
                f"column in schemas {settings.db_schemas}",
            )
            for check_id in POSTURE_CHECKS
        ]
    names = {row[0]: f"{row[1]}.{row[2]}" for row in tables}
    return [
        check_rls_enabled(tables),
        check_policies_present(tables, policies, names),
        check_always_true(policies, names),
        check_views(views),
        check_app_role(settings, roles, tables),
        check_default_context(settings, defaults),
    ]


POSTURE_CHECKS = (
    "rls.enabled_forced",
    "rls.policies_present",
    "rls.always_true_policy",
    "rls.views_security_invoker",
    "rls.app_role",
    "rls.default_context",
)


def check_rls_enabled(tables) -> CheckResult:
    not_enabled = [f"{s}.{t}" for _, s, t, enabled, _, _ in tables if not enabled]
    not_forced = [f"{s}.{t}" for _, s, t, _, forced, _ in tables if not forced]
    observed = {
        "tenant_tables": [f"{s}.{t}" for _, s, t, *_ in tables],
        "rls_disabled": not_enabled,
        "rls_not_forced": not_forced,
    }
    if not_enabled or not_forced:
        return failed(
            "rls.enabled_forced",
            "tenant tables without ENABLE + FORCE row-level security",
            **observed,
        )
    return passed(
        "rls.enabled_forced",
        "every tenant table has RLS enabled and forced",
        **observed,
    )


def check_policies_present(tables, policies, names) -> CheckResult:
    covered = {row[0] for row in policies}
    bare = [names[oid] for oid, *_ in tables if oid not in covered]
    counts = {names[oid]: sum(1 for p in policies if p[0] == oid) for oid, *_ in tables}
    if bare:
        return failed(
            "rls.policies_present",
            "tenant tables without any policy",
            tables_without_policy=bare,
            policies_per_table=counts,
        )
    return passed(
        "rls.policies_present",
        "every tenant table has policies",
        policies_per_table=counts,
    )


def check_always_true(policies, names) -> CheckResult:
    suspicious = []
    for oid, name, permissive, command, using_expr, check_expr in policies:
        for expr in (using_expr, check_expr):
            if permissive and expr is not None and expr.strip().lower() in ALWAYS_TRUE:
                suspicious.append(
                    {
                        "table": names[oid],
                        "policy": name,
                        "command": command,
                        "expression": expr,
                    }
                )
    if suspicious:
        return failed(
            "rls.always_true_policy",
            "permissive policies that pass every row",
            policies=suspicious,
        )
    return passed("rls.always_true_policy", "no policy is literally always true")


def check_views(views) -> CheckResult:
    unsafe = [
        {"view": f"{schema}.{view}", "reads": table,
         "kind": "materialized view" if kind == "m" else "view"}
        for view, schema, table, options, kind in views
        if kind == "m"
        or not any(
            opt.lower()
            in ("security_invoker=true", "security_invoker=on", "security_invoker=1")
            for opt in options
        )
    ]
    listed = sorted({f"{schema}.{view}" for view, schema, *_ in views})
    if unsafe:
        return failed(
            "rls.views_security_invoker",
            "views over tenant tables run with their owner's rights or hold a "
            "copy of the rows",
            views=unsafe,
        )
    return passed(
        "rls.views_security_invoker",
        "views over tenant tables use security_invoker",
        views=listed,
    )


def check_app_role(settings: Settings, roles, tables) -> CheckResult:
    role = settings.db_app_role
    if not roles:
        return inconclusive(
            "rls.app_role", f"role {role!r} not found; check UE_DB_APP_ROLE", role=role
        )
    superuser = [name for name, sup, _ in roles if sup]
    bypass = [name for name, _, byp in roles if byp]
    member_of = {name for name, *_ in roles}
    owned = [f"{s}.{t}" for _, s, t, _, _, owner in tables if owner in member_of]
    observed = {
        "role": role,
        "superuser_via": superuser,
        "bypassrls_via": bypass,
        "owns_tenant_tables": owned,
    }
    if superuser or bypass or owned:
        return failed(
            "rls.app_role",
            "the application role can bypass row-level security",
            **observed,
        )
    return passed(
        "rls.app_role",
        "the application role is bound by row-level security",
        **observed,
    )


def check_default_context(settings: Settings, defaults) -> CheckResult:
    prefix = settings.tenant_setting.lower() + "="
    found = [
        {"role": role or "(all)", "database": database or "(all)", "setting": entry}
        for role, database, config in defaults
        for entry in config or []
        if entry.lower().startswith(prefix)
    ]
    if found:
        return failed(
            "rls.default_context",
            "a role or database default sets the tenant context for every connection",
            defaults=found,
        )
    return passed(
        "rls.default_context", "no role or database default sets the tenant context"
    )


def count_query(settings: Settings, tables: list[tuple[str, str]]) -> sql.Composed:
    """Build one statement reading the context and each table's visible and foreign rows."""
    column = sql.Identifier(settings.db_org_column)
    parts = [
        sql.SQL("current_setting({}, true)").format(
            sql.Literal(settings.tenant_setting)
        )
    ]
    for schema, table in tables:
        ident = sql.Identifier(schema, table)
        parts.append(sql.SQL("(SELECT count(*) FROM {})").format(ident))
        parts.append(
            sql.SQL(
                "(SELECT count(*) FROM {} WHERE {}::text IS DISTINCT FROM %(org)s)"
            ).format(ident, column)
        )
    return sql.SQL("SELECT ") + sql.SQL(", ").join(parts)


def read_context(
    conn: psycopg.Connection,
    settings: Settings,
    query: sql.Composed,
    tables: list[tuple[str, str]],
    org: str,
) -> dict[str, object]:
    row = conn.execute(query, {"org": org}).fetchone()
    names = [f"{schema}.{table}" for schema, table in tables]
    return {
        "context": row[0],
        "visible": dict(zip(names, row[1::2])),
        "foreign": dict(zip(names, row[2::2])),
    }


def set_context(conn: psycopg.Connection, settings: Settings, org: str) -> None:
    conn.execute(
        settings.rls_context_sql, {"setting": settings.tenant_setting, "org": org}
    )


@task(
    name="probe-rls-context",
    retries=2,
    retry_delay_seconds=[5, 15],
    cache_policy=NO_CACHE,
)
def probe_rls_context(settings: Settings, orgs: list[str]) -> list[CheckResult]:
    """Set each org's context as the application does and read what it exposes."""
    logger = get_run_logger()
    try:
        with connect_database(settings) as conn:
            tables = [
                (row[1], row[2])
                for row in conn.execute(
                    TENANT_TABLES_SQL,
                    {
                        "column": settings.db_org_column,
                        "schemas": settings.db_schemas,
                    },
                ).fetchall()
            ]
    except psycopg.Error as error:
        problem = f"database unreachable: {describe_error(error)}"
        return [
            inconclusive(check_id, problem, org)
            for org in orgs
            for check_id in ORG_CHECKS
        ] + [inconclusive(check_id, problem) for check_id in GLOBAL_CHECKS]
    if not tables:
        problem = f"no table has a {settings.db_org_column!r} column"
        return [inconclusive(check_id, problem) for check_id in GLOBAL_CHECKS]

    query = count_query(settings, tables)
    try:
        per_org, without = read_all_contexts(settings, query, tables, orgs)
        reuse = read_after_reuse(settings, query, tables, orgs[0])
    except psycopg.errors.InsufficientPrivilege as error:
        problem = (
            f"cannot act as the application role {settings.db_app_role!r}: "
            f"{describe_error(error)}; grant it to the audit role"
        )
        return [inconclusive(check_id, problem) for check_id in GLOBAL_CHECKS]
    except psycopg.Error as error:
        problem = f"context probe failed: {describe_error(error)}"
        return [inconclusive(check_id, problem) for check_id in GLOBAL_CHECKS]
    logger.info(
        "rls: context probed for %d orgs over %d tables", len(orgs), len(tables)
    )

    checks = []
    for org in orgs:
        checks += evaluate_org_context(settings, org, per_org[org])
    checks.append(evaluate_fail_open(per_org, without))
    checks.append(evaluate_reuse(orgs[0], reuse))
    return checks


ORG_CHECKS = ("rls.context_readback", "rls.cross_org_rows")
GLOBAL_CHECKS = ("rls.fail_open", "rls.pool_reuse")


def read_all_contexts(
    settings: Settings,
    query: sql.Composed,
    tables: list[tuple[str, str]],
    orgs: list[str],
):
    """Read every org's context in one READ ONLY transaction, then none and empty."""
    with connect_database(settings) as conn:
        switch_to_app_role(conn, settings)
        without = {"unset": read_context(conn, settings, query, tables, "")}
        per_org = {}
        for org in orgs:
            set_context(conn, settings, org)
            per_org[org] = read_context(conn, settings, query, tables, org)
        conn.rollback()

        switch_to_app_role(conn, settings)
        conn.execute("SELECT set_config(%s, '', true)", (settings.tenant_setting,))
        without["empty"] = read_context(conn, settings, query, tables, "")
        conn.rollback()
    return per_org, without


def read_after_reuse(
    settings: Settings, query: sql.Composed, tables: list[tuple[str, str]], org: str
) -> dict[str, object]:
    """Set a context on a pooled connection, return it, and read the next checkout."""
    pool = ConnectionPool(
        settings.database_url.get_secret_value(),
        min_size=1,
        max_size=1,
        open=True,
        kwargs={"connect_timeout": 10},
    )
    try:
        with pool.connection() as conn:
            switch_to_app_role(conn, settings)
            set_context(conn, settings, org)
        with pool.connection() as conn:
            switch_to_app_role(conn, settings)
            return read_context(conn, settings, query, tables, "")
    finally:
        pool.close()


def evaluate_org_context(
    settings: Settings, org: str, seen: dict[str, object]
) -> list[CheckResult]:
    readback = seen["context"]
    if readback == org:
        context = passed(
            "rls.context_readback",
            "context reads back as the org",
            org,
            readback=readback,
        )
    else:
        context = failed(
            "rls.context_readback",
            "context does not read back as the org",
            org,
            readback=readback,
        )
    foreign = {table: n for table, n in seen["foreign"].items() if n}
    observed = {"visible_rows": seen["visible"], "foreign_rows": foreign}
    if foreign:
        rows = failed(
            "rls.cross_org_rows",
            "other orgs' rows are visible under this org's context",
            org,
            **observed,
        )
    elif not any(seen["visible"].values()):
        rows = inconclusive(
            "rls.cross_org_rows",
            "no rows visible under this org's context, so filtering is unproven",
            org,
            **observed,
        )
    else:
        rows = passed(
            "rls.cross_org_rows", "only the org's rows are visible", org, **observed
        )
    return [context, rows]


def evaluate_fail_open(
    per_org: dict[str, dict], without: dict[str, dict]
) -> CheckResult:
    leaks = {
        mode: {table: n for table, n in seen["visible"].items() if n}
        for mode, seen in without.items()
    }
    leaks = {mode: tables for mode, tables in leaks.items() if tables}
    populated = {
        table for seen in per_org.values() for table, n in seen["visible"].items() if n
    }
    tables = list(next(iter(without.values()))["visible"])
    unproven = [table for table in tables if table not in populated]
    observed = {"rows_without_context": leaks, "tables_without_pilot_rows": unproven}
    if leaks:
        return failed(
            "rls.fail_open", "tenant rows are visible without a context", **observed
        )
    if unproven:
        return inconclusive(
            "rls.fail_open",
            "some tenant tables have no pilot rows, so an empty answer proves nothing",
            **observed,
        )
    return passed(
        "rls.fail_open", "no tenant rows without a context (unset or empty)", **observed
    )


def evaluate_reuse(org: str, seen: dict[str, object]) -> CheckResult:
    leaked = {table: n for table, n in seen["visible"].items() if n}
    observed = {
        "org": org,
        "context_after_reuse": seen["context"],
        "rows_after_reuse": leaked,
    }
    if seen["context"]:
        return failed(
            "rls.pool_reuse",
            "a pooled connection keeps the previous org's context",
            **observed,
        )
    if leaked:
        return inconclusive(
            "rls.pool_reuse",
            "rows are visible on the reused connection without any context, so a "
            "kept org cannot be told apart from a fail-open policy (see "
            "rls.fail_open)",
            **observed,
        )
    return passed(
        "rls.pool_reuse", "a reused pooled connection has no context", **observed
    )
