"""The sandbox database on the local PostgreSQL: schema, policies, faults, cleanup."""

from __future__ import annotations

import subprocess
import sys
import time

import psycopg
import pytest

from ue_pilot.sandbox.database import (
    DEFAULT_ADMIN_URL,
    FORMULA_DESCRIPTIONS,
    SandboxDatabase,
    bulk_reward_csv_bytes,
    drop_leftovers,
)

ORGS = ["org_alpha01", "org_bravo02", "org_charlie03"]
TENANT_TABLES = ("members", "rewards", "tax_slips")


@pytest.fixture(scope="module")
def databases(request):
    """Create sandbox databases on demand, one per fault set, and drop them all."""
    created: dict[frozenset[str], SandboxDatabase] = {}

    def get(*faults: str, tenant_setting: str = "app.org_id") -> SandboxDatabase:
        key = frozenset(faults) | {f"setting={tenant_setting}"}
        if key not in created:
            created[key] = SandboxDatabase.create(
                org_ids=ORGS, faults=set(faults), tenant_setting=tenant_setting
            )
        return created[key]

    def drop_all() -> None:
        for database in created.values():
            database.drop()

    request.addfinalizer(drop_all)
    return get


@pytest.fixture(scope="module")
def clean(databases) -> SandboxDatabase:
    return databases()


def admin_query(database: SandboxDatabase, query: str, params=()) -> list[tuple]:
    with psycopg.connect(database.database_admin_url) as conn:
        return conn.execute(query, params).fetchall()


def app_count(database: SandboxDatabase, table: str, org_id: str | None = None) -> int:
    """Count rows of `table` as the app role, with the tenant context if given."""
    with psycopg.connect(database.app_url) as conn:
        if org_id is not None:
            conn.execute(
                "SELECT set_config(%s, %s, true)", (database.tenant_setting, org_id)
            )
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def server_has(name: str, catalog: str) -> bool:
    column = "datname" if catalog == "pg_database" else "rolname"
    with psycopg.connect(DEFAULT_ADMIN_URL) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {catalog} WHERE {column} = %s", (name,)
        ).fetchone()
    return row[0] == 1


def test_schema_has_tables(clean):
    """The public schema has the organizations table and the three tenant tables."""
    rows = admin_query(
        clean,
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
    )
    assert [name for (name,) in rows] == [
        "members",
        "organizations",
        "rewards",
        "tax_slips",
    ]


def test_view_is_security_invoker(clean):
    """The member_rewards view runs with the caller's privileges and policies."""
    rows = admin_query(
        clean, "SELECT reloptions FROM pg_class WHERE oid = 'member_rewards'::regclass"
    )
    assert "security_invoker=true" in rows[0][0]


def test_tables_owned_by_owner_role(clean):
    """Every table and the view belong to the NOLOGIN owner role."""
    rows = admin_query(
        clean,
        "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class"
        " WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'v')",
    )
    assert rows == [(clean.owner_role,)]


def test_owner_role_cannot_log_in(clean):
    """The owner role is NOLOGIN."""
    rows = admin_query(
        clean,
        "SELECT rolcanlogin FROM pg_roles WHERE rolname = %s",
        (clean.owner_role,),
    )
    assert rows == [(False,)]


def test_app_role_attributes(clean):
    """The app role logs in without superuser or BYPASSRLS."""
    rows = admin_query(
        clean,
        "SELECT rolcanlogin, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = %s",
        (clean.app_role,),
    )
    assert rows == [(True, False, False)]


def test_audit_role_is_noinherit(clean):
    """The audit role logs in and does not inherit the app role's privileges."""
    rows = admin_query(
        clean,
        "SELECT rolcanlogin, rolinherit, rolsuper FROM pg_roles WHERE rolname = %s",
        (clean.audit_role,),
    )
    assert rows == [(True, False, False)]


def test_audit_role_memberships(clean):
    """The audit role is a member of the app role and of pg_read_all_stats."""
    rows = admin_query(
        clean,
        "SELECT pg_get_userbyid(roleid) FROM pg_auth_members"
        " WHERE member = to_regrole(%s) ORDER BY 1",
        (clean.audit_role,),
    )
    assert sorted(name for (name,) in rows) == sorted(
        [clean.app_role, "pg_read_all_stats"]
    )


def test_public_cannot_connect(clean):
    """PUBLIC has no privilege on the sandbox database."""
    rows = admin_query(
        clean,
        "SELECT count(*) FROM pg_database, aclexplode(datacl) AS acl"
        " WHERE datname = current_database() AND acl.grantee = 0",
    )
    assert rows == [(0,)]


@pytest.mark.parametrize("table", TENANT_TABLES)
def test_tenant_table_rls_forced(clean, table):
    """Each tenant table has row-level security enabled and forced."""
    rows = admin_query(
        clean,
        "SELECT relrowsecurity, relforcerowsecurity FROM pg_class"
        " WHERE oid = %s::regclass",
        (table,),
    )
    assert rows == [(True, True)]


def test_organizations_has_no_rls(clean):
    """The organizations table is not a tenant table."""
    rows = admin_query(
        clean,
        "SELECT relrowsecurity FROM pg_class WHERE oid = 'organizations'::regclass",
    )
    assert rows == [(False,)]


@pytest.mark.parametrize("table", TENANT_TABLES)
def test_tenant_table_policy_commands(clean, table):
    """Each tenant table has one policy per command: SELECT, INSERT, UPDATE, DELETE."""
    rows = admin_query(
        clean,
        "SELECT polcmd FROM pg_policy WHERE polrelid = %s::regclass ORDER BY 1",
        (table,),
    )
    assert sorted(cmd for (cmd,) in rows) == ["a", "d", "r", "w"]


def test_update_policy_checks_both_sides(clean):
    """The UPDATE policy has both a USING and a WITH CHECK expression."""
    rows = admin_query(
        clean,
        "SELECT polqual IS NOT NULL, polwithcheck IS NOT NULL FROM pg_policy"
        " WHERE polrelid = 'rewards'::regclass AND polcmd = 'w'",
    )
    assert rows == [(True, True)]


def test_policy_reads_tenant_setting(clean):
    """The SELECT policy compares org_id with the configured setting."""
    rows = admin_query(
        clean,
        "SELECT pg_get_expr(polqual, polrelid) FROM pg_policy"
        " WHERE polrelid = 'members'::regclass AND polcmd = 'r'",
    )
    assert "current_setting('app.org_id'::text, true)" in rows[0][0]


@pytest.mark.parametrize("table", TENANT_TABLES)
def test_app_without_context_reads_nothing(clean, table):
    """The app role reads no tenant rows when no tenant context is set."""
    assert app_count(clean, table) == 0


@pytest.mark.parametrize(
    ("table", "expected"), [("members", 20), ("rewards", 50), ("tax_slips", 20)]
)
def test_app_with_context_reads_own_org(clean, table, expected):
    """Under an org's context the app role reads exactly that org's seed rows."""
    assert app_count(clean, table, "org_bravo02") == expected


def test_app_context_hides_other_orgs(clean):
    """Under an org's context no row of another org is visible."""
    with psycopg.connect(clean.app_url) as conn:
        conn.execute("SELECT set_config('app.org_id', 'org_alpha01', true)")
        orgs = conn.execute("SELECT DISTINCT org_id FROM rewards").fetchall()
    assert orgs == [("org_alpha01",)]


def test_view_applies_policies(clean):
    """The security-invoker view returns only the context org's rows."""
    with psycopg.connect(clean.app_url) as conn:
        conn.execute("SELECT set_config('app.org_id', 'org_alpha01', true)")
        orgs = conn.execute("SELECT DISTINCT org_id FROM member_rewards").fetchall()
    assert orgs == [("org_alpha01",)]


def test_app_insert_other_org_rejected(clean):
    """The INSERT policy rejects a row of another org than the context."""
    with psycopg.connect(clean.app_url) as conn:
        conn.execute("SELECT set_config('app.org_id', 'org_alpha01', true)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                "INSERT INTO members (id, org_id, full_name, email, role)"
                " VALUES ('x:1', 'org_bravo02', 'X', 'x@example.org', 'member')"
            )


def test_app_update_cannot_move_row(clean):
    """The UPDATE policy rejects moving a row to another org."""
    with psycopg.connect(clean.app_url) as conn:
        conn.execute("SELECT set_config('app.org_id', 'org_alpha01', true)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE rewards SET org_id = 'org_bravo02'")


def test_audit_direct_select_denied(clean):
    """The audit role has no table privilege of its own."""
    with (
        psycopg.connect(clean.audit_url) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("SELECT count(*) FROM members")


def test_audit_reads_app_rows(clean):
    """In a READ ONLY transaction after SET ROLE the audit reads the app's rows."""
    with psycopg.connect(clean.audit_url) as conn:
        conn.execute("BEGIN READ ONLY")
        conn.execute(f'SET LOCAL ROLE "{clean.app_role}"')
        conn.execute("SELECT set_config('app.org_id', 'org_charlie03', true)")
        count = conn.execute("SELECT count(*) FROM tax_slips").fetchone()[0]
    assert count == 20


def test_audit_sessions_read_only(clean):
    """Audit sessions start read-only, so a write fails even as the app role."""
    with psycopg.connect(clean.audit_url) as conn:
        conn.execute(f'SET ROLE "{clean.app_role}"')
        conn.execute("SELECT set_config('app.org_id', 'org_alpha01', true)")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM rewards")


def test_organizations_seeded(clean):
    """Each org has one organizations row."""
    rows = admin_query(clean, "SELECT id FROM organizations ORDER BY id")
    assert [org for (org,) in rows] == sorted(ORGS)


def test_seed_is_deterministic(clean, databases):
    """Two sandboxes seeded with the same org hold the same rows for it."""
    other = databases("rls-fail-open")
    query = (
        "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM tax_slips AS t"
        " WHERE org_id = 'org_alpha01'"
    )
    assert admin_query(clean, query) == admin_query(other, query)


@pytest.fixture(scope="module")
def grown(request) -> SandboxDatabase:
    """A one-org sandbox that gained a second org through add_org."""
    database = SandboxDatabase.create(org_ids=ORGS[:1], faults=set())
    request.addfinalizer(database.drop)
    database.add_org("org_delta04")
    return database


def test_add_org_seeds_rows(grown):
    """add_org inserts the new org's seed rows."""
    assert app_count(grown, "rewards", "org_delta04") == 50


def test_add_org_seeds_organization(grown):
    """add_org inserts the new org's organizations row."""
    rows = admin_query(grown, "SELECT count(*) FROM organizations")
    assert rows == [(2,)]


def test_add_org_records_org(grown):
    """add_org appends the org to org_ids."""
    assert grown.org_ids == [ORGS[0], "org_delta04"]


def test_add_org_rejects_duplicate(clean):
    """add_org raises ValueError for an org that is already seeded."""
    with pytest.raises(ValueError):
        clean.add_org("org_alpha01")


@pytest.fixture(scope="module")
def bulk(request) -> SandboxDatabase:
    """A sandbox whose first org gained 1,000 bulk rewards in two calls."""
    database = SandboxDatabase.create(org_ids=ORGS, faults=set())
    request.addfinalizer(database.drop)
    database.add_bulk_rewards("org_alpha01", 600)
    database.add_bulk_rewards("org_alpha01", 400)
    return database


def test_bulk_rewards_count(bulk):
    """add_bulk_rewards adds its rows to the org's 50 seeded rewards."""
    assert app_count(bulk, "rewards", "org_alpha01") == 1050


def test_bulk_rewards_other_orgs_unchanged(bulk):
    """add_bulk_rewards leaves other orgs' rewards alone."""
    assert app_count(bulk, "rewards", "org_bravo02") == 50


def test_bulk_rewards_numbered_on(bulk):
    """A second call numbers its ids on from the first call's last id."""
    rows = admin_query(
        bulk,
        "SELECT min(id), max(id) FROM rewards"
        " WHERE org_id = 'org_alpha01' AND starts_with(id, 'org_alpha01:b')",
    )
    assert rows == [("org_alpha01:b0000000001", "org_alpha01:b0000001000")]


def test_bulk_rewards_reference_members(bulk):
    """Every bulk reward references a seeded member of its own org."""
    rows = admin_query(
        bulk,
        "SELECT count(*) FROM rewards AS r"
        " LEFT JOIN members AS m ON m.id = r.member_id AND m.org_id = r.org_id"
        " WHERE m.id IS NULL",
    )
    assert rows == [(0,)]


def test_bulk_rewards_need_context(bulk):
    """Without a tenant context the app role reads none of the bulk rows."""
    assert app_count(bulk, "rewards") == 0


def test_bulk_row_bytes_short_org():
    """A bulk reward of an org id of up to 14 characters takes 100 CSV bytes."""
    assert bulk_reward_csv_bytes("org_alpha01") == 100


def test_bulk_row_bytes_long_org():
    """A bulk reward of a 34-character org id takes more than 100 CSV bytes."""
    assert bulk_reward_csv_bytes("org_" + "x" * 30) > 100


def test_bulk_rewards_unknown_org(clean):
    """add_bulk_rewards raises ValueError for an org the database lacks."""
    with pytest.raises(ValueError, match="not seeded"):
        clean.add_bulk_rewards("org_zulu99", 10)


@pytest.mark.parametrize("rows", [0, -5])
def test_bulk_rewards_rejects_count(clean, rows):
    """add_bulk_rewards raises ValueError for a row count below 1."""
    with pytest.raises(ValueError, match="invalid row count"):
        clean.add_bulk_rewards("org_alpha01", rows)


def test_formula_fault_descriptions(databases):
    """Fault export-formula-cells writes the formula texts to each org's rewards."""
    database = databases("export-formula-cells")
    rows = admin_query(
        database,
        "SELECT description FROM rewards WHERE org_id = 'org_bravo02'"
        " AND id <= 'org_bravo02:r006' ORDER BY id",
    )
    assert [description for (description,) in rows] == list(FORMULA_DESCRIPTIONS)


def test_formula_fault_prefixes(databases):
    """The formula texts start with =, +, -, @, tab and CR."""
    prefixes = {description[0] for description in FORMULA_DESCRIPTIONS}
    assert prefixes == {"=", "+", "-", "@", "\t", "\r"}


def test_formula_fault_row_count(databases):
    """Fault export-formula-cells changes six rewards per org."""
    database = databases("export-formula-cells")
    rows = admin_query(
        database,
        "SELECT count(*) FROM rewards WHERE description = ANY(%s)",
        (list(FORMULA_DESCRIPTIONS),),
    )
    assert rows == [(6 * len(ORGS),)]


def test_formula_fault_added_org():
    """Fault export-formula-cells also applies to an org added with add_org."""
    database = SandboxDatabase.create(org_ids=ORGS[:1], faults={"export-formula-cells"})
    try:
        database.add_org("org_delta04")
        rows = admin_query(
            database,
            "SELECT count(*) FROM rewards"
            " WHERE org_id = 'org_delta04' AND description = ANY(%s)",
            (list(FORMULA_DESCRIPTIONS),),
        )
    finally:
        database.drop()
    assert rows == [(6,)]


def test_clean_has_no_formula_cells(clean):
    """Without the fault no reward description starts like a formula."""
    rows = admin_query(
        clean,
        "SELECT count(*) FROM rewards"
        " WHERE left(description, 1)"
        " = ANY(ARRAY['=', '+', '-', '@', E'\\t', E'\\r'])",
    )
    assert rows == [(0,)]


def test_rls_disabled_fault_catalog(databases):
    """Fault rls-disabled turns row-level security off on tax_slips."""
    database = databases("rls-disabled")
    rows = admin_query(
        database,
        "SELECT relrowsecurity FROM pg_class WHERE oid = 'tax_slips'::regclass",
    )
    assert rows == [(False,)]


def test_rls_disabled_fault_leaks(databases):
    """Fault rls-disabled lets the app role read every org's tax slips."""
    database = databases("rls-disabled")
    assert app_count(database, "tax_slips", "org_alpha01") == 20 * len(ORGS)


def test_rls_not_forced_fault_owner(databases):
    """Fault rls-not-forced makes the app role the owner of rewards."""
    database = databases("rls-not-forced")
    rows = admin_query(
        database,
        "SELECT pg_get_userbyid(relowner), relforcerowsecurity FROM pg_class"
        " WHERE oid = 'rewards'::regclass",
    )
    assert rows == [(database.app_role, False)]


def test_rls_not_forced_fault_leaks(databases):
    """Fault rls-not-forced lets the owning app role read rewards without context."""
    database = databases("rls-not-forced")
    assert app_count(database, "rewards") == 50 * len(ORGS)


def test_rls_fail_open_fault_policy(databases):
    """Fault rls-fail-open adds a permissive SELECT policy on members."""
    database = databases("rls-fail-open")
    rows = admin_query(
        database,
        "SELECT polpermissive, polcmd FROM pg_policy"
        " WHERE polrelid = 'members'::regclass AND polname = 'members_fail_open'",
    )
    assert rows == [(True, "r")]


def test_rls_fail_open_fault_leaks(databases):
    """Fault rls-fail-open shows every member to a query without context."""
    database = databases("rls-fail-open")
    assert app_count(database, "members") == 20 * len(ORGS)


def test_rls_fail_open_with_context(databases):
    """Fault rls-fail-open is invisible to a query with context."""
    database = databases("rls-fail-open")
    assert app_count(database, "members", "org_alpha01") == 20


def test_custom_tenant_setting(databases):
    """A custom tenant setting name is used by the policies."""
    database = databases(tenant_setting="app.current_org_id")
    assert app_count(database, "members", "org_alpha01") == 20


def test_invalid_tenant_setting_rejected():
    """A setting name that is not a dotted identifier raises ValueError."""
    with pytest.raises(ValueError):
        SandboxDatabase.create(
            org_ids=ORGS, faults=set(), tenant_setting="app.org_id'); DROP TABLE x; --"
        )


def test_unknown_fault_rejected():
    """An unknown fault name raises before anything is created."""
    with pytest.raises(ValueError):
        SandboxDatabase.create(org_ids=ORGS, faults={"rls-typo"})


def test_drop_removes_database_and_roles():
    """drop() removes the database and its three roles, and can run twice."""
    database = SandboxDatabase.create(org_ids=ORGS[:1], faults=set())
    database.drop()
    database.drop()
    names = [database.name, database.owner_role, database.app_role, database.audit_role]
    remaining = [
        name
        for name in names
        if server_has(name, "pg_database" if name == database.name else "pg_roles")
    ]
    assert remaining == []


def test_drop_ends_open_sessions():
    """drop() succeeds while the app role still has an open connection."""
    database = SandboxDatabase.create(org_ids=ORGS[:1], faults=set())
    conn = psycopg.connect(database.app_url)
    try:
        database.drop()
    finally:
        conn.close()
    assert not server_has(database.name, "pg_database")


def test_drop_leftovers_removes_dead_run(clean):
    """drop_leftovers drops a sandbox whose creating process has exited."""
    script = (
        "import os\n"
        "from ue_pilot.sandbox.database import SandboxDatabase\n"
        "db = SandboxDatabase.create(org_ids=['org_ghost01'], faults=set())\n"
        "print(db.name, flush=True)\n"
        "os._exit(0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    name = result.stdout.strip()
    dropped = drop_leftovers()
    assert name in dropped


def test_drop_leftovers_keeps_live_run(clean):
    """drop_leftovers keeps a sandbox whose creating process still runs."""
    drop_leftovers()
    assert server_has(clean.name, "pg_database")


def test_seed_1000_orgs_fast():
    """Creating and seeding 1,000 orgs takes seconds, not minutes."""
    orgs = [f"org_scale{index:04d}" for index in range(1000)]
    started = time.perf_counter()
    database = SandboxDatabase.create(org_ids=orgs, faults=set())
    elapsed = time.perf_counter() - started
    try:
        rows = admin_query(database, "SELECT count(*) FROM rewards")
    finally:
        database.drop()
    print(f"\ncreate + seed of 1000 orgs: {elapsed:.2f} s")
    assert rows == [(50_000,)]
    # NOTE: the bound is a generous guess. This test measured about 1.3 s on 2 cores.
    assert elapsed < 30
