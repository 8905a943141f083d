"""The blob archive of the rollback flow, against Azurite and the real SDK.

One Azurite serves the module. Each test archives in its own container, so
the tests do not depend on each other's order.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from azure.storage.blob import BlobBlock, ContainerClient, ContentSettings
from prefect import flow
from prefect.artifacts import Artifact

from tasks.archive import (
    ArchiveCopyError,
    ArchiveError,
    ArchiveIncompleteError,
    ArchiveSummary,
    ChunkedMove,
    archive_blobs,
    archive_org,
    check_org,
    delete_sources,
    list_records,
    plan_copies,
    write_manifest,
)
from ue_pilot.orgids import InvalidOrgIdError
from ue_pilot.sandbox.azurite import Azurite
from ue_pilot.sandbox.runner import SandboxProcess
from ue_pilot.settings import Settings
from ue_pilot.storage import build_blob_service

REPO = Path(__file__).resolve().parent.parent
PATTERN = r"^org_[A-Za-z0-9]{1,60}$"
ORG = "org_sandbox0001"
_container_numbers = itertools.count()

# Runs archive_org in a child process that the test kills with SIGKILL. The
# child slows the phase the kill should land in, copies or delete batches, so
# the kill falls between requests of that phase rather than after the run.
# Phase "chunks" moves 50 blobs per chunk, so the kill lands after some
# sources are deleted while later chunks are still being copied.
KILLED_CHILD = """
import os, sys, time
from azure.storage.blob import BlobClient, ContainerClient
from tasks.archive import archive_org
from ue_pilot.storage import build_blob_service

container_name, org, phase = sys.argv[1:4]
if phase in ("copy", "chunks"):
    copy = BlobClient.start_copy_from_url
    def slow_copy(self, *args, **kwargs):
        time.sleep(0.05)
        return copy(self, *args, **kwargs)
    BlobClient.start_copy_from_url = slow_copy
else:
    delete = ContainerClient.delete_blobs
    def slow_delete(self, *args, **kwargs):
        responses = delete(self, *args, **kwargs)
        time.sleep(0.3)
        return responses
    ContainerClient.delete_blobs = slow_delete
service = build_blob_service(os.environ["ARCHIVE_TEST_CONNECTION_STRING"])
archive_org(
    service.get_container_client(container_name), org,
    pattern=r"^org_[A-Za-z0-9]{1,60}$", known_org_ids=[], batch_size=20,
    chunk_size=50 if phase == "chunks" else 1000,
)
print("finished", flush=True)
"""


@pytest.fixture(autouse=True)
def reject_default_credential(monkeypatch):
    """Fail any test that builds DefaultAzureCredential."""
    import azure.identity

    def reject(*args, **kwargs):
        raise AssertionError("a test built DefaultAzureCredential")

    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", reject)


@pytest.fixture(scope="module")
def azurite():
    with Azurite.start() as running:
        yield running


@pytest.fixture
def container(azurite) -> ContainerClient:
    """A new, empty container for one test."""
    service = build_blob_service(azurite.connection_string)
    return service.create_container(f"archive{next(_container_numbers)}")


def blob_content(name: str, size: int = 1024) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def upload(container: ContainerClient, name: str, tags: bool = True) -> None:
    """Upload a 1 KiB blob with Content-MD5, metadata and (optionally) tags."""
    data = blob_content(name)
    container.get_blob_client(name).upload_blob(
        data,
        metadata={"orgid": name.split("/")[0], "kind": "evidence"},
        tags={"retention": "7y", "source": "test"} if tags else None,
        content_settings=ContentSettings(
            content_type="application/json",
            content_md5=bytearray(hashlib.md5(data).digest()),
        ),
    )


def upload_without_md5(container: ContainerClient, name: str) -> None:
    """Commit a block blob without Content-MD5, which the service then lacks."""
    blob = container.get_blob_client(name)
    blob.stage_block("YmxvY2s=", blob_content(name, 300))
    blob.commit_block_list([BlobBlock("YmxvY2s=")], metadata={"kind": "no-md5"})


def seed(container: ContainerClient, org: str, count: int) -> list[str]:
    """Upload `count` blobs under `<org>/`, every third without tags."""
    names = [f"{org}/evidence/{index // 50:02d}/pack {index:04d}.json"
             for index in range(count)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda item: upload(container, item[1], item[0] % 3 != 0),
                      enumerate(names)))
    return names


def seed_with_manifest(container: ContainerClient, count: int):
    """Seed `count` blobs under ORG and write the open manifest a run would write."""
    names = seed(container, ORG, count)
    records = list_records(container, f"{ORG}/")
    return names, write_manifest(container, ORG, records, f"{ORG}/")


def snapshot(container: ContainerClient, prefix: str) -> dict[str, tuple]:
    """Return {name relative to prefix: (size, MD5, metadata, tags)}."""
    return {
        name[len(prefix):]: record.content()
        for name, record in list_records(container, prefix).items()
    }


def md5_of_download(container: ContainerClient, name: str) -> str:
    data = container.download_blob(name).readall()
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def run_archive(container: ContainerClient, org: str = ORG, **options) -> dict:
    summary = archive_org(
        container, org, pattern=PATTERN, known_org_ids=options.pop("known", []),
        **options,
    )
    return summary.to_dict()


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def count_blobs(container: ContainerClient, prefix: str) -> int:
    return sum(1 for _ in container.list_blob_names(name_starts_with=prefix))


def test_archive_moves_every_blob(container):
    """Every blob moves with its content, metadata and tags; none stays behind."""
    seed(container, ORG, 40)
    upload_without_md5(container, f"{ORG}/raw/no md5.bin")
    before = snapshot(container, f"{ORG}/")
    no_md5 = md5_of_download(container, f"{ORG}/raw/no md5.bin")

    summary = run_archive(container)
    after = snapshot(container, f"archived/{ORG}/")

    assert summary["complete"] is True
    assert summary["matches_manifest"] is True
    assert summary["copied"] == 41
    assert summary["deleted"] == 41
    assert count_blobs(container, f"{ORG}/") == 0
    assert after == before
    assert md5_of_download(container, f"archived/{ORG}/raw/no md5.bin") == no_md5


def test_archive_manifest_records_before(container):
    """The manifest lists each blob's size and MD5, and its sha256 is the blob's."""
    names = seed(container, ORG, 12)

    summary = run_archive(container)
    data = container.download_blob(summary["manifest"]["blob"]).readall()
    document = json.loads(data)
    entries = {entry["name"]: entry for entry in document["entries"]}

    assert summary["manifest"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert summary["manifest"]["state"] == "complete"
    assert sorted(entries) == sorted(name[len(ORG) + 1:] for name in names)
    for name in names:
        entry = entries[name[len(ORG) + 1:]]
        expected = base64.b64encode(hashlib.md5(blob_content(name)).digest())
        assert entry["size"] == 1024
        assert entry["md5"] == expected.decode()


def test_archive_rerun_changes_nothing(container):
    """A second run of a finished archive copies and deletes nothing."""
    seed(container, ORG, 10)
    first = run_archive(container)
    etags = {r.name: r.etag for r in list_records(container, "").values()}

    second = run_archive(container)

    assert second["copied"] == 0
    assert second["deleted"] == 0
    assert second["manifest"]["sha256"] == first["manifest"]["sha256"]
    assert second["matches_manifest"] is True
    assert {r.name: r.etag for r in list_records(container, "").values()} == etags


@pytest.mark.parametrize("phase", ["copy", "delete", "chunks"])
def test_archive_resumes_after_kill(container, azurite, phase):
    """A run killed by SIGKILL mid-phase is finished by the next run, blob for blob."""
    seed(container, ORG, 300)
    before = snapshot(container, f"{ORG}/")
    environment = dict(os.environ, ARCHIVE_TEST_CONNECTION_STRING=(
        azurite.connection_string))
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, container.container_name, ORG, phase],
        cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        if phase == "copy":
            started = wait_until(
                lambda: count_blobs(container, f"archived/{ORG}/") >= 30, 60)
        elif phase == "chunks":
            started = wait_until(lambda: count_blobs(container, f"{ORG}/") < 250, 60)
        else:
            started = wait_until(lambda: count_blobs(container, f"{ORG}/") < 300, 60)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        _, errors = child.communicate()
    sources = count_blobs(container, f"{ORG}/")
    copies = count_blobs(container, f"archived/{ORG}/")
    assert started, errors.decode()[-2000:]
    assert child.returncode == -signal.SIGKILL
    if phase == "copy":
        assert sources == 300
        assert 0 < copies < 300
    elif phase == "chunks":
        assert 0 < sources < 250
        assert copies < 300
    else:
        assert 0 < sources < 300

    summary = run_archive(container)
    after = snapshot(container, f"archived/{ORG}/")
    manifests = list(container.list_blob_names(name_starts_with="archived/_manifests/"))

    assert count_blobs(container, f"{ORG}/") == 0
    assert len(after) == len(before)
    assert after == before
    assert summary["complete"] is True
    assert summary["matches_manifest"] is True
    assert summary["manifest"]["blobs"] == 300
    assert manifests == [summary["manifest"]["blob"]]


@pytest.mark.parametrize(
    "org_id",
    ["", "..", "*", "org_sandbox000", "org_" + "a" * 61, f"{ORG}/..", "org_none01",
     "org_sandbox0001*"],
    ids=["empty", "dotdot", "star", "prefix", "too-long", "path", "unknown",
         "wildcard"],
)
def test_archive_rejects_bad_org_id(container, org_id):
    """An id that is not exactly one known org is rejected before any change."""
    seed(container, ORG, 5)
    before = {r.name: r.etag for r in list_records(container, "").values()}

    with pytest.raises(InvalidOrgIdError) as caught:
        run_archive(container, org_id)

    assert {r.name: r.etag for r in list_records(container, "").values()} == before
    assert org_id[:20] in str(caught.value)


def test_archive_prefix_error_names_longer_org(container):
    """The error for a prefix of another org's id names that org."""
    seed(container, ORG, 2)

    with pytest.raises(InvalidOrgIdError, match=ORG):
        run_archive(container, "org_sandbox000")


def test_check_org_rejects_reserved_name(container):
    """A pattern that admits `archived` still cannot make it an org."""
    seed(container, ORG, 2)
    run_archive(container)

    with pytest.raises(InvalidOrgIdError, match="reserved"):
        check_org(container, "archived", r"^[a-z_]+$", [])


def test_archive_keeps_org_with_longer_id(container):
    """Archiving org_sandbox0001 leaves org_sandbox00010, whose id it starts."""
    seed(container, ORG, 5)
    other = seed(container, "org_sandbox00010", 5)

    run_archive(container)

    assert sorted(container.list_blob_names(name_starts_with="org_sandbox00010/")) == (
        sorted(other))
    assert count_blobs(container, "archived/org_sandbox00010/") == 0


def test_archive_accepts_listed_org_without_blobs(container):
    """A pilot org with no blobs archives nothing and completes."""
    summary = run_archive(container, "org_empty01", known=["org_empty01"])

    assert summary["complete"] is True
    assert summary["listed"] == 0
    assert summary["manifest"] is None


def test_archive_never_overwrites_earlier_archive(container):
    """An older archived blob that differs from its source is a conflict, kept as is."""
    names = seed(container, ORG, 6)
    earlier = f"archived/{names[0]}"
    container.get_blob_client(earlier).upload_blob(b"an earlier archive")
    time.sleep(1.1)  # Last-Modified has whole seconds; the manifest must be newer.

    with pytest.raises(ArchiveIncompleteError) as caught:
        run_archive(container)

    assert caught.value.summary["problems"]["conflict"]["names"] == [earlier]
    assert container.download_blob(earlier).readall() == b"an earlier archive"
    assert list(container.list_blob_names(name_starts_with=f"{ORG}/")) == [names[0]]
    assert count_blobs(container, f"archived/{ORG}/") == 6


def test_archive_recopies_stale_copy(container):
    """A copy that a killed run left different from its source is copied again."""
    names, manifest = seed_with_manifest(container, 5)
    time.sleep(1.1)  # An upload in the manifest's second would be a conflict.
    stale = f"archived/{names[2]}"
    container.get_blob_client(stale).upload_blob(b"a copy cut short")

    summary = run_archive(container)

    assert summary["manifest"]["blob"] == manifest.blob
    assert summary["copied"] == 5
    assert container.download_blob(stale).readall() == blob_content(names[2])
    assert summary["matches_manifest"] is True


def test_archive_in_chunks_resumes_earlier_run(container):
    """Chunks of 5 finish a run that an earlier one left half done.

    The earlier run's state: a manifest, 8 sources already moved, 3 stale
    copies in a later chunk. The running listing then starts with the moved
    blobs, so its pages do not line up with the chunks.
    """
    names = seed(container, ORG, 40)
    before = snapshot(container, f"{ORG}/")
    write_manifest(container, ORG, list_records(container, f"{ORG}/"), f"{ORG}/")
    for name in names[:8]:
        target = container.get_blob_client(f"archived/{name}")
        tags = container.get_blob_client(name).get_blob_tags()
        target.start_copy_from_url(container.get_blob_client(name).url, tags=tags)
        container.delete_blob(name)
    time.sleep(1.1)  # An upload in the manifest's second would be a conflict.
    for name in names[30:33]:
        container.get_blob_client(f"archived/{name}").upload_blob(b"cut short")

    summary = run_archive(container, chunk_size=5, batch_size=3)

    assert summary["complete"] is True
    assert summary["matches_manifest"] is True
    assert summary["copied"] == 32
    assert summary["deleted"] == 32
    assert snapshot(container, f"archived/{ORG}/") == before
    assert count_blobs(container, f"{ORG}/") == 0


def test_chunk_listing_sets_aside_pending_copies(container):
    """A page that reaches a later chunk's stale copy does not count it as verified."""
    names, manifest = seed_with_manifest(container, 12)
    time.sleep(1.1)  # An upload in the manifest's second would be a conflict.
    stale = f"archived/{names[10]}"
    container.get_blob_client(stale).upload_blob(b"cut short")
    sources = list_records(container, f"{ORG}/")
    destinations = list_records(container, f"archived/{ORG}/")
    summary = ArchiveSummary(ORG, container.container_name, f"{ORG}/",
                             f"archived/{ORG}/")
    jobs = plan_copies(sources, destinations, manifest, summary)
    move = ChunkedMove(
        container=container, summary=summary, sources=sources,
        destinations=destinations, jobs=jobs, computed_md5={}, progress=None,
        workers=2, batch_size=256, chunk_size=4,
    )

    move.copied_through = 0
    move.read_listing_through(f"archived/{names[-1]}")

    assert move.cursor.ended is True
    assert stale not in move.listed_after_copy
    assert len(move.chunks) == 3
    move.copied_through = 2
    move.run()
    assert summary.deleted == 12
    assert container.download_blob(stale).readall() == blob_content(names[10])


def test_delete_keeps_source_changed_after_listing(container):
    """A source modified after it was listed fails its etag condition and stays."""
    names = seed(container, ORG, 3)
    records = list(list_records(container, f"{ORG}/").values())
    container.get_blob_client(names[1]).set_blob_metadata({"changed": "yes"})
    summary = ArchiveSummary(ORG, container.container_name, f"{ORG}/",
                             f"archived/{ORG}/")

    delete_sources(container, records, summary, None, batch_size=256)

    assert summary.deleted == 2
    assert summary.problems == {"changed_after_copy": [names[1]]}
    assert list(container.list_blob_names(name_starts_with=f"{ORG}/")) == [names[1]]


def test_blob_copy_fails_deletes_nothing(ue_env, monkeypatch):
    """Under the blob-copy-fails fault the archive raises and deletes no source."""
    with SandboxProcess(orgs=2, storage=True, faults=["blob-copy-fails"]) as sandbox:
        ue_env(sandbox.env)
        monkeypatch.setenv("UE_BLOB_RETRY_TOTAL", "0")
        faulty = build_blob_service(sandbox.env["UE_BLOB_CONNECTION_STRING"])
        container = faulty.create_container("evidence")
        seed(container, ORG, 20)
        before = {r.name: r.etag for r in list_records(container, "").values()}

        with pytest.raises(ArchiveCopyError) as caught:
            archive_blobs.fn(Settings(), ORG)
        after = {r.name: r.etag for r in list_records(container, "").values()}

        direct = sandbox.env["UE_SANDBOX_BLOB_CONNECTION_STRING"]
        monkeypatch.setenv("UE_BLOB_CONNECTION_STRING", direct)
        summary = archive_blobs.fn(Settings(), ORG)

    assert "No source was deleted" in str(caught.value)
    assert "500" in str(caught.value)
    assert {n: e for n, e in after.items() if not n.startswith("archived/")} == before
    assert not [n for n in after if n.startswith(f"archived/{ORG}/")]
    assert summary["complete"] is True
    assert summary["manifest_archived"] == 20


def test_archive_blobs_reports_progress(azurite, ue_env, prefect_server):
    """Inside a flow the task returns the summary and leaves progress at 100 %."""
    service = build_blob_service(azurite.connection_string)
    container = service.create_container("archiveflow")
    seed(container, "org_flow01", 8)
    ue_env({
        "UE_BLOB_CONNECTION_STRING": azurite.connection_string,
        "UE_BLOB_CONTAINER": "archiveflow",
        "UE_PILOT_ORG_IDS": "org_flow01",
    })

    @flow(name="archive-blobs-test")
    def archive_flow(org_id: str) -> dict:
        return archive_blobs(Settings(), org_id)

    summary = archive_flow("org_flow01")
    artifact = Artifact.get("archive-blobs-org-flow01")

    assert summary["complete"] is True
    assert summary["deleted"] == 8
    assert artifact is not None
    assert artifact.data == 100.0


# Other writers and edits during an archive


def test_deleted_copy_keeps_source(container, monkeypatch):
    """A copy that vanishes after the first listing is not trusted: its source stays."""
    import tasks.archive as archive_module

    names = seed(container, ORG, 4)
    write_manifest(container, ORG, list_records(container, f"{ORG}/"), f"{ORG}/")
    for name in names:
        tags = container.get_blob_client(name).get_blob_tags()
        container.get_blob_client(f"archived/{name}").start_copy_from_url(
            container.get_blob_client(name).url, tags=tags)
    copy_all = archive_module.copy_all

    def delete_a_copy_first(*args, **kwargs):
        copy = container.get_blob_client(f"archived/{names[0]}")
        if copy.exists():
            copy.delete_blob()
        return copy_all(*args, **kwargs)

    monkeypatch.setattr(archive_module, "copy_all", delete_a_copy_first)
    with pytest.raises(ArchiveIncompleteError) as caught:
        run_archive(container, chunk_size=2)

    assert caught.value.summary["problems"]["unverified"]["names"] == [names[0]]
    assert container.get_blob_client(names[0]).exists()


def test_same_second_copy_is_conflict(container):
    """An earlier archive's blob from the manifest's second is a conflict, kept."""
    upload(container, f"{ORG}/report.csv")
    run_archive(container)
    container.get_blob_client(f"{ORG}/report.csv").upload_blob(b"version 2")

    with pytest.raises(ArchiveIncompleteError) as caught:
        run_archive(container)

    archived = container.download_blob(f"archived/{ORG}/report.csv").readall()
    assert archived == blob_content(f"{ORG}/report.csv")
    assert "conflict" in caught.value.summary["problems"]


def test_retagged_source_is_kept(container, monkeypatch):
    """New tags leave a source's etag as it was, so the fresh listing keeps it."""
    import tasks.archive as archive_module

    names = seed(container, ORG, 3)
    copy_all = archive_module.copy_all

    def tag_then_copy(*args, **kwargs):
        container.get_blob_client(names[1]).set_blob_tags({"hold": "legal"})
        return copy_all(*args, **kwargs)

    monkeypatch.setattr(archive_module, "copy_all", tag_then_copy)
    with pytest.raises(ArchiveIncompleteError) as caught:
        run_archive(container)
    monkeypatch.setattr(archive_module, "copy_all", copy_all)
    summary = run_archive(container)

    assert caught.value.summary["problems"]["changed_after_copy"]["names"] == [
        names[1]]
    assert summary["complete"] is True
    assert container.get_blob_client(f"archived/{names[1]}").get_blob_tags() == {
        "hold": "legal"}


def test_edited_manifest_stops_archive(container):
    """A manifest whose content no longer has its recorded sha256 is rejected."""
    seed(container, ORG, 2)
    manifest = write_manifest(
        container, ORG, list_records(container, f"{ORG}/"), f"{ORG}/")
    blob = container.get_blob_client(manifest.blob)
    metadata = blob.get_blob_properties().metadata
    blob.upload_blob(b'{"entries": []}', overwrite=True, metadata=metadata)

    with pytest.raises(ArchiveError, match="was changed after it was written"):
        run_archive(container)
    assert count_blobs(container, f"archived/{ORG}/") == 0


def test_source_deleted_elsewhere_is_fine(container, monkeypatch):
    """A verified source that another run deleted first does not fail the archive."""
    import tasks.archive as archive_module

    names = seed(container, ORG, 3)
    delete_sources = archive_module.delete_sources

    def another_run_deletes_first(container_client, records, *args):
        container_client.delete_blob(records[0].name)
        return delete_sources(container_client, records, *args)

    monkeypatch.setattr(archive_module, "delete_sources", another_run_deletes_first)
    summary = run_archive(container)

    assert summary["complete"] is True
    assert summary["problems"] == {}
    assert count_blobs(container, f"{ORG}/") == 0
    assert names[0][len(ORG) + 1:] in snapshot(container, f"archived/{ORG}/")
