"""Azurite's blob service, driven through the real azure-storage-blob client.

One Azurite serves the whole module. Blob names are unique per test, so the
tests do not depend on each other's order.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from azure.core import MatchConditions
from azure.core.credentials import AccessToken, AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError, ResourceModifiedError
from azure.storage.blob import ContentSettings, PartialBatchErrorException

from ue_pilot.sandbox.azurite import (
    ACCOUNT_KEY,
    ACCOUNT_NAME,
    Azurite,
    AzuriteStartError,
)
from ue_pilot.sandbox.servers import LOOPBACK, find_free_port
from ue_pilot.storage import build_blob_service

CONTENT = b'{"check": "rls.fail_open", "result": "pass"}\n'
CONTENT_MD5 = hashlib.md5(CONTENT).digest()
METADATA = {"orgid": "org_alpha01", "checkid": "rls.fail_open"}
IF_UNCHANGED = MatchConditions.IfNotModified
# Starts Azurite, prints its PID and data directory, then waits to be killed.
STARTER_SCRIPT = """
import time
from ue_pilot.sandbox.azurite import Azurite
azurite = Azurite.start()
print(azurite.pid, azurite.location, flush=True)
time.sleep(120)
"""


@pytest.fixture(autouse=True)
def reject_default_credential(monkeypatch):
    """Fail any test that builds DefaultAzureCredential."""
    import azure.identity

    def reject(*args, **kwargs):
        raise AssertionError("a test built DefaultAzureCredential")

    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", reject)


@pytest.fixture(scope="module")
def started():
    """Start one Azurite for the module and time its start in seconds."""
    began = time.monotonic()
    with Azurite.start() as azurite:
        yield azurite, time.monotonic() - began


@pytest.fixture(scope="module")
def azurite(started):
    return started[0]


@pytest.fixture(scope="module")
def container(azurite):
    service = build_blob_service(connection_string=azurite.connection_string)
    return service.create_container("evidence")


def upload(container, name, content=CONTENT, **options):
    """Upload `content` with its Content-MD5 and return the blob client."""
    blob = container.get_blob_client(name)
    settings = ContentSettings(
        content_type="application/json",
        content_md5=hashlib.md5(content).digest(),
    )
    blob.upload_blob(content, content_settings=settings, **options)
    return blob


def resident_kib(pid: int) -> int:
    """Return the resident set size of a process in KiB, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until a process exits and return whether it did within `timeout` s.

    An orphan's zombie stays until PID 1 reaps it, and a container's PID 1 may
    never do that, so a zombie counts as exited.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return True
        time.sleep(0.1)
    return False


def test_upload_stores_content_md5(container):
    """An upload keeps the Content-MD5 it was sent with."""
    blob = upload(container, "org_alpha01/rls/2026/05/pack01/md5.json")

    properties = blob.get_blob_properties()

    assert properties.content_settings.content_md5 == CONTENT_MD5


def test_upload_stores_metadata(container):
    """An upload keeps its metadata."""
    blob = upload(
        container, "org_alpha01/rls/2026/05/pack01/meta.json", metadata=METADATA
    )

    assert blob.get_blob_properties().metadata == METADATA


def test_upload_rejects_wrong_md5(container):
    """An upload whose Content-MD5 does not match its body fails with 400."""
    blob = container.get_blob_client("org_alpha01/rls/2026/05/pack01/bad.json")
    wrong = ContentSettings(content_md5=hashlib.md5(b"other").digest())

    with pytest.raises(HttpResponseError) as caught:
        blob.upload_blob(CONTENT, content_settings=wrong)

    assert caught.value.status_code == 400
    assert caught.value.error_code == "Md5Mismatch"


def test_list_by_prefix(container):
    """Listing by an org's prefix returns that org's blobs and no other."""
    names = [
        "org_bravo02/access/2026/05/pack02/a.json",
        "org_bravo02/access/2026/05/pack02/b.json",
    ]
    for name in names + ["org_bravo020/access/2026/05/pack02/a.json"]:
        upload(container, name)

    listed = container.list_blobs(name_starts_with="org_bravo02/")

    assert [blob.name for blob in listed] == names


def test_copy_status_success(container):
    """Azurite finishes a same-account copy before it returns, unlike Azure."""
    source = upload(container, "copy/status/source.json")
    target = container.get_blob_client("copy/status/target.json")

    result = target.start_copy_from_url(source.url)

    assert result["copy_status"] == "success"
    assert target.get_blob_properties().copy.status == "success"


def test_copy_keeps_content(container):
    """A copy has the source's size, Content-MD5, metadata and bytes."""
    source = upload(container, "copy/content/source.json", metadata=METADATA)
    target = container.get_blob_client("copy/content/target.json")

    target.start_copy_from_url(source.url)
    properties = target.get_blob_properties()

    assert properties.size == len(CONTENT)
    assert properties.content_settings.content_md5 == CONTENT_MD5
    assert properties.metadata == METADATA
    assert properties.copy.source == source.url
    assert target.download_blob().readall() == CONTENT


def test_tags_round_trip(container):
    """Tags set on a blob come back unchanged."""
    blob = upload(container, "tags/round-trip.json")

    blob.set_blob_tags({"retention": "7y", "orgid": "org_alpha01"})

    assert blob.get_blob_tags() == {"retention": "7y", "orgid": "org_alpha01"}


def test_copy_drops_tags(container):
    """A copy without `tags` leaves the target untagged."""
    source = upload(container, "copy/tags/source.json")
    source.set_blob_tags({"retention": "7y"})
    target = container.get_blob_client("copy/tags/untagged.json")

    target.start_copy_from_url(source.url)

    assert target.get_blob_tags() == {}


def test_copy_sets_given_tags(container):
    """A copy with `tags` gives the target exactly those tags."""
    source = upload(container, "copy/tags/source-given.json")
    source.set_blob_tags({"retention": "7y"})
    target = container.get_blob_client("copy/tags/given.json")

    target.start_copy_from_url(source.url, tags={"moved": "yes"})

    assert target.get_blob_tags() == {"moved": "yes"}


def test_sync_copy_copies_tags(container):
    """A synchronous copy with tags="COPY" gives the target the source's tags."""
    source = upload(container, "copy/tags/source-sync.json")
    source.set_blob_tags({"retention": "7y"})
    target = container.get_blob_client("copy/tags/sync.json")

    target.start_copy_from_url(source.url, requires_sync=True, tags="COPY")

    assert target.get_blob_tags() == {"retention": "7y"}


def test_delete_rejects_stale_etag(container):
    """A delete conditioned on an outdated etag fails with 412 and keeps the blob."""
    blob = upload(container, "delete/stale.json")
    stale = blob.get_blob_properties().etag
    blob.set_blob_metadata({"changed": "yes"})

    with pytest.raises(ResourceModifiedError) as caught:
        blob.delete_blob(etag=stale, match_condition=IF_UNCHANGED)

    assert caught.value.status_code == 412
    assert blob.exists()


def test_delete_with_current_etag(container):
    """A delete conditioned on the current etag removes the blob."""
    blob = upload(container, "delete/current.json")
    etag = blob.get_blob_properties().etag

    blob.delete_blob(etag=etag, match_condition=IF_UNCHANGED)

    assert not blob.exists()


def test_batch_delete_honours_etags(container):
    """A batch delete rejects the entry whose etag is stale and deletes the rest."""
    names = [f"batch/etags/{index}.json" for index in range(3)]
    etags = [upload(container, name).get_blob_properties().etag for name in names]
    container.get_blob_client(names[0]).set_blob_metadata({"changed": "yes"})
    entries = [
        {"name": name, "etag": etag, "match_condition": IF_UNCHANGED}
        for name, etag in zip(names, etags)
    ]

    responses = container.delete_blobs(*entries, raise_on_any_failure=False)
    left = container.list_blobs(name_starts_with="batch/etags/")

    assert [response.status_code for response in responses] == [412, 202, 202]
    assert [blob.name for blob in left] == [names[0]]


def test_batch_delete_raises_partial_error(container):
    """A batch delete with a failed entry raises PartialBatchErrorException."""
    names = ["batch/raise/0.json", "batch/raise/1.json"]
    stale = upload(container, names[0]).get_blob_properties().etag
    upload(container, names[1])
    container.get_blob_client(names[0]).set_blob_metadata({"changed": "yes"})
    entry = {"name": names[0], "etag": stale, "match_condition": IF_UNCHANGED}

    with pytest.raises(PartialBatchErrorException) as caught:
        container.delete_blobs(entry, names[1])

    assert [part.status_code for part in caught.value.parts] == [412, 202]


def test_account_url_with_key_credential(azurite, container):
    """An account URL with a shared key credential reaches the same account."""
    key = AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY)
    service = build_blob_service(account_url=azurite.account_url, credential=key)

    names = [item.name for item in service.list_containers()]

    assert "evidence" in names


def test_account_url_defaults_to_default_credential(monkeypatch):
    """Without a credential, the account URL form builds DefaultAzureCredential."""
    import azure.identity

    built = []

    class RecordingCredential:
        def __init__(self, **kwargs):
            built.append(kwargs)

        def get_token(self, *scopes, **kwargs):
            return AccessToken("unused", int(time.time()) + 3600)

    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", RecordingCredential)

    build_blob_service(account_url="https://example.blob.core.windows.net")

    assert built == [{}]


def test_build_without_account_raises():
    """Building a client with neither a connection string nor a URL fails."""
    with pytest.raises(ValueError, match="no blob storage account configured"):
        build_blob_service()


def test_loopback_client_ignores_proxy(azurite, container, monkeypatch):
    """A client for Azurite ignores HTTP_PROXY, which points at a closed port."""
    closed = f"http://{LOOPBACK}:{find_free_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, closed)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    service = build_blob_service(azurite.connection_string, retry_total=0)

    assert service.get_container_client("evidence").exists()


def test_start_rejects_taken_port(azurite):
    """Starting on a port that is in use fails before Azurite runs."""
    with pytest.raises(AzuriteStartError, match="in use"):
        Azurite.start(port=azurite.port)


def test_start_without_binary_names_npm_ci(tmp_path):
    """A missing azurite-blob binary raises an error that names `npm ci`."""
    with pytest.raises(AzuriteStartError, match="npm ci"):
        Azurite.start(binary=tmp_path / "azurite-blob")


def test_stop_leaves_no_process():
    """Stopping ends the child, frees the port and deletes the temporary data."""
    azurite = Azurite.start()
    pid, port, location = azurite.pid, azurite.port, azurite.location

    azurite.stop()
    azurite.stop()

    assert azurite.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, port), timeout=2).close()
    assert not location.exists()


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_killed_starter_stops_azurite():
    """Azurite exits when the process that started it is killed with SIGKILL."""
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER_SCRIPT], stdout=subprocess.PIPE, text=True
    )
    try:
        pid_text, location = starter.stdout.readline().split()
    finally:
        starter.kill()
        starter.wait()
        starter.stdout.close()
    pid = int(pid_text)

    exited = wait_for_exit(pid, timeout=10)
    if not exited:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(location, ignore_errors=True)

    assert exited


def test_stop_keeps_given_location(tmp_path):
    """Stopping keeps a data directory that the caller passed in."""
    location = tmp_path / "azurite"

    with Azurite.start(location=location):
        pass

    assert (location / "__azurite_db_blob__.json").exists()


def test_start_time_and_rss(started, capsys):
    """Print Azurite's start time and resident memory after the tests above."""
    azurite, seconds = started

    rss = resident_kib(azurite.pid)
    with capsys.disabled():
        print(f"\nAzurite 3.37.0: started in {seconds:.2f} s, RSS {rss / 1024:.0f} MiB")

    assert rss > 0
