"""Exports of the Union-Eyes stand-in over real HTTP on 127.0.0.1, backed by real
PostgreSQL: streamed CSV, paged JSON, bulk rows and the export faults."""

from __future__ import annotations

import csv
import io
import time
from collections import Counter

import httpx
import psycopg
import pytest

import ue_pilot.sandbox.app as app_module
from ue_pilot.sandbox.app import (
    CSV_BOM,
    PAGE_SIZE,
    TRUNCATED_RESPONSES_PER_ROUTE,
    SessionRegistry,
    create_ue_app,
)
from ue_pilot.sandbox.database import (
    FORMULA_DESCRIPTIONS,
    SandboxDatabase,
    bulk_reward_csv_bytes,
)
from ue_pilot.sandbox.servers import RunningServer, start_server

ORG = "org_alpha01"
ORGS = [ORG, "org_bravo02", "org_charlie03"]
REWARDS = "/api/v2/rewards/export"
TAX = "/api/v2/tax/cra/export"
SEEDED_REWARDS = 50
BULK_REWARDS = 250
ORG_REWARDS = SEEDED_REWARDS + BULK_REWARDS
MEMORY_ROWS = 1_000_000
REWARD_COLUMNS = ["id", "org_id", "member_id", "points", "description", "awarded_at"]


class App:
    """One running app instance with its sessions and an HTTP client."""

    def __init__(self, server: RunningServer, sessions: SessionRegistry) -> None:
        self.server = server
        self.sessions = sessions
        self.client = httpx.Client(base_url=server.url, timeout=60)

    def headers(self, org_id: str | None = ORG) -> dict[str, str]:
        """Return the bearer header of a new session, without an org for None."""
        return {"Authorization": f"Bearer {self.sessions.issue(org_id)}"}

    def get(self, path: str, org_id: str | None = ORG, **params: str) -> httpx.Response:
        return self.client.get(path, headers=self.headers(org_id), params=params)

    def pages(self, path: str, org_id: str = ORG) -> list[dict]:
        """Follow `next` from page 1 to the end and return every page body."""
        headers = self.headers(org_id)
        url: str | None = f"{path}?format=json"
        bodies = []
        while url:
            body = self.client.get(url, headers=headers).json()
            bodies.append(body)
            url = body["next"]
        return bodies

    def received(self, path: str, org_id: str | None = ORG, **params: str) -> bytes:
        """Read a response body up to where the server stops.

        Raises AssertionError when the body arrives complete.
        """
        body = bytearray()
        request = self.client.build_request(
            "GET", path, headers=self.headers(org_id), params=params
        )
        response = self.client.send(request, stream=True)
        try:
            for chunk in response.iter_raw():
                body += chunk
        except httpx.RemoteProtocolError:
            return bytes(body)
        finally:
            response.close()
        raise AssertionError(f"the body of {path} arrived complete")


@pytest.fixture(scope="module")
def database(request) -> SandboxDatabase:
    """Three orgs, the first with bulk rewards so its JSON export has 3 pages."""
    database = SandboxDatabase.create(org_ids=ORGS, faults=set())
    request.addfinalizer(database.drop)
    database.add_bulk_rewards(ORG, BULK_REWARDS)
    return database


@pytest.fixture(scope="module")
def formula_database(request) -> SandboxDatabase:
    database = SandboxDatabase.create(org_ids=ORGS, faults={"export-formula-cells"})
    request.addfinalizer(database.drop)
    return database


@pytest.fixture(scope="module")
def start(request):
    """Start app instances on demand; every one is stopped at module end."""
    running: list[App] = []

    def start_app(database: SandboxDatabase, *faults: str, **options) -> App:
        sessions = SessionRegistry()
        app = create_ue_app(
            app_url=database.app_url,
            tenant_setting=database.tenant_setting,
            sessions=sessions,
            telemetry=None,
            faults=set(faults),
            org_ids=database.org_ids,
            **options,
        )
        running.append(App(start_server(app), sessions))
        return running[-1]

    def stop_all() -> None:
        for app in running:
            app.client.close()
            app.server.stop()

    request.addfinalizer(stop_all)
    return start_app


@pytest.fixture(scope="module")
def clean(start, database) -> App:
    return start(database)


def csv_records(body: bytes) -> list[list[str]]:
    """Parse CSV bytes that start with a byte order mark, header included."""
    text = body.decode("utf-8-sig")
    return list(csv.reader(io.StringIO(text, newline="")))


def expected_csv(database: SandboxDatabase, org_id: str) -> bytes:
    """Render the org's rewards from the database the way the export must."""
    with psycopg.connect(database.database_admin_url) as conn:
        rows = conn.execute(
            "SELECT id, org_id, member_id, points, description, awarded_at"
            " FROM rewards WHERE org_id = %s ORDER BY id",
            (org_id,),
        ).fetchall()
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(REWARD_COLUMNS)
    for *values, awarded_at in rows:
        writer.writerow([*values, awarded_at.strftime("%Y-%m-%dT%H:%M:%SZ")])
    return CSV_BOM + buffer.getvalue().encode()


def served_ids(bodies: list[dict]) -> list[str]:
    return [row["id"] for body in bodies for row in body["results"]]


# Streamed CSV.


def test_csv_starts_with_bom(clean):
    """The CSV export starts with the UTF-8 byte order mark."""
    assert clean.get(REWARDS).content[:3] == CSV_BOM


def test_csv_bom_once(clean):
    """The byte order mark appears only at the start."""
    assert clean.get(REWARDS).content.count(CSV_BOM) == 1


def test_csv_content_type(clean):
    """The CSV export is text/csv in UTF-8."""
    content_type = clean.get(REWARDS).headers["content-type"]
    assert content_type == "text/csv; charset=utf-8"


def test_csv_is_chunked(clean):
    """The streamed CSV has no Content-Length and uses chunked encoding."""
    headers = clean.get(REWARDS).headers
    assert "content-length" not in headers
    assert headers["transfer-encoding"] == "chunked"


def test_csv_attachment_name(clean):
    """The CSV export keeps its attachment file name."""
    disposition = clean.get(TAX).headers["content-disposition"]
    assert disposition == 'attachment; filename="tax-cra-export.csv"'


def test_csv_bytes_exact(clean, database):
    """The CSV body is byte for byte the org's rewards in id order."""
    assert clean.get(REWARDS).content == expected_csv(database, ORG)


@pytest.mark.parametrize("batch_rows", [7, 100, 300])
def test_csv_batch_sizes(clean, database, monkeypatch, batch_rows):
    """The CSV body is the same for any cursor batch size, even or uneven."""
    monkeypatch.setattr(app_module, "CSV_BATCH_ROWS", batch_rows)
    assert clean.get(REWARDS).content == expected_csv(database, ORG)


def test_csv_bulk_row_length(clean):
    """Every bulk reward line takes bulk_reward_csv_bytes bytes."""
    lines = clean.get(REWARDS).content.split(b"\r\n")
    bulk_lines = [line for line in lines if line.startswith(f"{ORG}:b".encode())]
    lengths = {len(line) + 2 for line in bulk_lines}
    assert len(bulk_lines) == BULK_REWARDS
    assert lengths == {bulk_reward_csv_bytes(ORG)}


def test_csv_matches_json(clean):
    """A CSV row contains the same values as the JSON row of the same id."""
    header, *rows = csv_records(clean.get(REWARDS).content)
    csv_row = dict(zip(header, rows[0]))
    json_row = clean.get(REWARDS, format="json").json()["results"][0]
    assert csv_row == {key: str(value) for key, value in json_row.items()}


def test_csv_tax_amount_text(clean):
    """Tax slip amounts keep two decimals in the CSV export."""
    header, *rows = csv_records(clean.get(TAX).content)
    amounts = [row[header.index("amount")] for row in rows]
    assert {len(amount.partition(".")[2]) for amount in amounts} == {2}


def test_csv_empty_export(clean):
    """A session without an org gets the BOM and the header row only."""
    response = clean.get(REWARDS, None)
    assert response.content == CSV_BOM + (",".join(REWARD_COLUMNS) + "\r\n").encode()


def test_csv_head_no_body(clean):
    """A HEAD request gets the CSV headers and no body."""
    response = clean.client.head(REWARDS, headers=clean.headers())
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.content == b""


def test_csv_query_error_500(start):
    """A query that fails before the first row gets status 500, not a cut 200."""
    database = SandboxDatabase.create(org_ids=[ORG], faults=set())
    try:
        app = start(database)
        with psycopg.connect(database.database_admin_url, autocommit=True) as conn:
            conn.execute(f'REVOKE SELECT ON rewards FROM "{database.app_role}"')
        response = app.get(REWARDS)
    finally:
        database.drop()
    assert response.status_code == 500


def test_csv_parsed_by_audit(clean):
    """The audit's row counter reads the BOM-prefixed export."""
    from tasks.http_probes import count_row_orgs

    response = clean.get(REWARDS)
    counts = count_row_orgs(
        response.content, response.headers["content-type"], "org_id"
    )
    assert counts == {ORG: ORG_REWARDS}


# Paged JSON.


def test_json_pages_to_end(clean):
    """Following next from page 1 serves every row once, in id order."""
    bodies = clean.pages(REWARDS)
    ids = served_ids(bodies)
    assert len(bodies) == 3
    assert len(ids) == ORG_REWARDS
    assert ids == sorted(ids)
    assert len(set(ids)) == ORG_REWARDS


def test_json_page_sizes(clean):
    """Full pages have 100 rows and the last has the rest."""
    sizes = [len(body["results"]) for body in clean.pages(REWARDS)]
    assert sizes == [PAGE_SIZE, PAGE_SIZE, ORG_REWARDS - 2 * PAGE_SIZE]


def test_json_count_every_page(clean):
    """Every page reports the same count."""
    counts = {body["count"] for body in clean.pages(REWARDS)}
    assert counts == {ORG_REWARDS}


def test_json_page_has_length(clean):
    """A JSON page declares its Content-Length."""
    response = clean.get(REWARDS, format="json")
    assert int(response.headers["content-length"]) == len(response.content)


# Streaming memory and cleanup.


@pytest.fixture(scope="module")
def big_database(request) -> SandboxDatabase:
    """One org with 1,000,000 bulk rewards, about a 100 MB CSV export."""
    database = SandboxDatabase.create(org_ids=[ORG], faults=set())
    request.addfinalizer(database.drop)
    started = time.perf_counter()
    database.add_bulk_rewards(ORG, MEMORY_ROWS)
    print(
        f"\ninsert of {MEMORY_ROWS:,} bulk rows: {time.perf_counter() - started:.1f} s"
    )
    return database


def status_kb(field: str) -> int:
    """Read one memory field of this process from /proc, in KiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(f"no {field} in /proc/self/status")


def test_stream_memory_flat(start, big_database):
    """Streaming a 100 MB export raises the process's peak RSS by under 50 MB."""
    app = start(big_database)
    app.get(REWARDS)  # The first request opens the pool and warms the imports.
    baseline = status_kb("VmRSS")
    # Writing 5 to clear_refs resets VmHWM, the peak RSS, to the current RSS.
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")

    received = 0
    started = time.perf_counter()
    with app.client.stream("GET", REWARDS, headers=app.headers()) as response:
        for chunk in response.iter_raw():
            received += len(chunk)
    elapsed = time.perf_counter() - started
    peak = status_kb("VmHWM")

    print(
        f"\nstreamed {received / 1e6:.0f} MB in {elapsed:.1f} s;"
        f" RSS {baseline / 1024:.0f} MB before, peak {peak / 1024:.0f} MB"
    )
    assert received > MEMORY_ROWS * bulk_reward_csv_bytes(ORG)
    # The server thread and the client share this process. Reading the
    # export into memory instead raises the peak by several hundred MB.
    assert peak - baseline < 50 * 1024


def test_disconnect_frees_connection(start, big_database):
    """A client that leaves a large export early frees the pool's only connection."""
    app = start(big_database, pool_max_size=1)
    with app.client.stream("GET", REWARDS, headers=app.headers()) as response:
        next(response.iter_raw())
    started = time.perf_counter()
    response = app.get(TAX)
    assert response.status_code == 200
    assert time.perf_counter() - started < 5


def test_disconnect_ends_transaction(start, big_database):
    """A client that leaves a large export early leaves no open transaction."""
    app = start(big_database)
    with app.client.stream("GET", REWARDS, headers=app.headers()) as response:
        next(response.iter_raw())
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND state <> 'idle'"
    )
    busy = None
    with psycopg.connect(big_database.database_admin_url, autocommit=True) as conn:
        for _ in range(50):
            busy = conn.execute(query, (big_database.app_role,)).fetchone()[0]
            if busy == 0:
                break
            time.sleep(0.1)
    assert busy == 0


# Fault export-truncated.


@pytest.fixture(scope="module")
def truncated(start, database) -> App:
    return start(database, "export-truncated")


def test_truncated_csv_first_requests_cut(truncated):
    """The first two CSV requests on a route end without the last chunk."""
    for _ in range(TRUNCATED_RESPONSES_PER_ROUTE):
        with pytest.raises(httpx.RemoteProtocolError):
            truncated.get(REWARDS)


def test_truncated_csv_later_complete(truncated):
    """Once two responses on a route were cut, the next one arrives whole."""
    truncated.received(TAX)
    truncated.received(TAX)
    rows = csv_records(truncated.get(TAX).content)[1:]
    assert len(rows) == 20


def test_truncated_csv_cut_mid_record(start, database):
    """A cut CSV contains 60 % of the rows whole, then part of the next record."""
    app = start(database, "export-truncated")
    body = app.received(REWARDS)
    whole = int(ORG_REWARDS * 0.6)
    lines = body.split(b"\r\n")
    assert len(lines) == 1 + whole + 1
    assert lines[-1] != b""
    assert expected_csv(database, ORG).startswith(body)


def test_truncated_csv_small_batches(start, database, monkeypatch):
    """The cut falls on the same record when it lies inside a later batch."""
    monkeypatch.setattr(app_module, "CSV_BATCH_ROWS", 7)
    app = start(database, "export-truncated")
    body = app.received(REWARDS)
    assert len(body.split(b"\r\n")) == 1 + int(ORG_REWARDS * 0.6) + 1
    assert expected_csv(database, ORG).startswith(body)


def test_truncated_csv_status_200(start, database):
    """A cut CSV response still started with status 200, as after a proxy timeout."""
    app = start(database, "export-truncated")
    request = app.client.build_request("GET", REWARDS, headers=app.headers())
    response = app.client.send(request, stream=True)
    try:
        assert response.status_code == 200
    finally:
        response.close()


def test_truncated_routes_counted_apart(start, database):
    """Cut responses are counted per route: the tax route is cut after rewards."""
    app = start(database, "export-truncated")
    app.received(REWARDS)
    app.received(REWARDS)
    app.get(REWARDS)
    body = app.received(TAX)
    assert body.startswith(CSV_BOM)


def test_truncated_empty_export_cut(start, database):
    """An export without rows is cut in the middle of its header row."""
    app = start(database, "export-truncated")
    full = CSV_BOM + (",".join(REWARD_COLUMNS) + "\r\n").encode()
    assert app.received(REWARDS, None) == full[: len(full) // 2]


def test_truncated_json_page_cut(start, database):
    """A cut JSON page declares its full Content-Length but sends less."""
    app = start(database, "export-truncated")
    request = app.client.build_request(
        "GET", REWARDS, headers=app.headers(), params={"format": "json"}
    )
    response = app.client.send(request, stream=True)
    declared = int(response.headers["content-length"])
    body = bytearray()
    with pytest.raises(httpx.RemoteProtocolError):
        for chunk in response.iter_raw():
            body += chunk
    response.close()
    assert 0 < len(body) < declared


def test_truncated_json_retry_completes(start, database):
    """The third request for a page arrives whole, so a retrying client finishes."""
    app = start(database, "export-truncated")
    app.received(REWARDS, format="json")
    app.received(REWARDS, format="json")
    ids = served_ids(app.pages(REWARDS))
    assert len(ids) == ORG_REWARDS


# Fault export-cross-org-row.


@pytest.fixture(scope="module")
def cross_org(start, database) -> App:
    return start(database, "export-cross-org-row")


def test_cross_org_csv_one_foreign_row(cross_org):
    """The CSV export of one org carries exactly one row of another org."""
    rows = csv_records(cross_org.get(REWARDS, "org_bravo02").content)[1:]
    orgs = Counter(row[1] for row in rows)
    assert orgs["org_bravo02"] == SEEDED_REWARDS
    assert sum(orgs.values()) == SEEDED_REWARDS + 1


def test_cross_org_csv_foreign_org(cross_org):
    """The foreign row belongs to the first other org."""
    rows = csv_records(cross_org.get(REWARDS, "org_bravo02").content)[1:]
    foreign = {row[1] for row in rows} - {"org_bravo02"}
    assert foreign == {ORG}


def test_cross_org_csv_in_id_order(cross_org):
    """The foreign row sits at its place in id order."""
    rows = csv_records(cross_org.get(REWARDS, "org_charlie03").content)[1:]
    ids = [row[0] for row in rows]
    assert ids == sorted(ids)


def test_cross_org_csv_foreign_time_format(cross_org):
    """The foreign row's timestamp has the same format as the others."""
    rows = csv_records(cross_org.get(REWARDS, "org_bravo02").content)[1:]
    lengths = {len(row[5]) for row in rows}
    assert lengths == {len("2025-01-04T00:00:00Z")}


@pytest.mark.parametrize("batch_rows", [7, 100, 2000])
def test_cross_org_csv_batch_sizes(cross_org, monkeypatch, batch_rows):
    """A foreign row that sorts last is spliced in once for any batch size."""
    monkeypatch.setattr(app_module, "CSV_BATCH_ROWS", batch_rows)
    ids = [row[0] for row in csv_records(cross_org.get(REWARDS).content)[1:]]
    assert len(ids) == ORG_REWARDS + 1
    assert ids[-1] == "org_bravo02:r001"


def test_cross_org_tax_export(cross_org):
    """The tax export carries one foreign row as well."""
    rows = csv_records(cross_org.get(TAX, "org_charlie03").content)[1:]
    foreign = [row for row in rows if row[1] != "org_charlie03"]
    assert len(foreign) == 1


def test_cross_org_json_count(cross_org):
    """The JSON count includes the foreign row."""
    body = cross_org.get(REWARDS, "org_bravo02", format="json").json()
    assert body["count"] == SEEDED_REWARDS + 1


def test_cross_org_json_pages(cross_org):
    """Paging a multi-page export serves every own row and one foreign row."""
    ids = served_ids(cross_org.pages(REWARDS, "org_bravo02"))
    foreign = [row_id for row_id in ids if not row_id.startswith("org_bravo02:")]
    assert len(foreign) == 1
    assert len(set(ids)) == len(ids)


def test_cross_org_json_multi_page(cross_org):
    """An org whose export spans pages gets every own row plus the foreign one."""
    ids = served_ids(cross_org.pages(REWARDS, ORG))
    assert len(ids) == ORG_REWARDS + 1
    assert len(set(ids)) == ORG_REWARDS + 1
    assert ids == sorted(ids)


# Fault export-page-drift.


@pytest.fixture(scope="module")
def drift(start, database) -> App:
    return start(database, "export-page-drift")


def test_drift_repeats_one_id(drift):
    """The last row of page 1 is served again on page 2."""
    bodies = drift.pages(REWARDS)
    repeated = [i for i, n in Counter(served_ids(bodies)).items() if n > 1]
    assert repeated == [bodies[0]["results"][-1]["id"]]


def test_drift_loses_one_id(drift, clean):
    """Exactly one row, the 101st in id order, is never served."""
    all_ids = served_ids(clean.pages(REWARDS))
    missing = set(all_ids) - set(served_ids(drift.pages(REWARDS)))
    assert missing == {all_ids[PAGE_SIZE]}


def test_drift_count_unchanged(drift):
    """Every page reports the true count."""
    counts = {body["count"] for body in drift.pages(REWARDS)}
    assert counts == {ORG_REWARDS}


def test_drift_same_row_total(drift):
    """The pages together still hold count rows."""
    assert len(served_ids(drift.pages(REWARDS))) == ORG_REWARDS


def test_drift_spares_csv(drift, database):
    """The CSV export is unaffected by the page drift."""
    assert drift.get(REWARDS).content == expected_csv(database, ORG)


def test_drift_single_page_unaffected(drift):
    """An export of one page serves every row once."""
    ids = served_ids(drift.pages(REWARDS, "org_bravo02"))
    assert len(set(ids)) == SEEDED_REWARDS


# Fault export-formula-cells.


@pytest.fixture(scope="module")
def formula(start, formula_database) -> App:
    return start(formula_database)


def test_formula_cells_csv(formula):
    """The CSV export carries each formula description as entered."""
    header, *rows = csv_records(formula.get(REWARDS).content)
    descriptions = [row[header.index("description")] for row in rows]
    assert descriptions[: len(FORMULA_DESCRIPTIONS)] == list(FORMULA_DESCRIPTIONS)


def test_formula_cells_unescaped(formula):
    """The CSV export does not neutralize formulas with a leading quote."""
    body = formula.get(REWARDS).content
    assert b',"=HYPERLINK(""https://example.invalid/claim"",""Claim reward"")",' in body
    assert b",@SUM(A1:A10)," in body


def test_formula_cells_cr_quoted(formula):
    """A description that starts with CR is quoted, so the record stays whole."""
    body = formula.get(REWARDS).content
    assert b',"\rCarriage return before the note",' in body


def test_formula_cells_json(formula):
    """The JSON export carries the same formula descriptions."""
    rows = formula.get(REWARDS, format="json").json()["results"]
    descriptions = [row["description"] for row in rows]
    assert descriptions[: len(FORMULA_DESCRIPTIONS)] == list(FORMULA_DESCRIPTIONS)
