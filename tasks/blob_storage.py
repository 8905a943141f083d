"""Azure Blob Storage: streamed uploads with Content-MD5, manifests, links.

Uploads stage blocks as bytes arrive and commit the block list at the end, so
memory stays flat whatever the size, and a blob appears only once it is
complete: uncommitted blocks are never visible and the service discards them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, ResourceExistsError
from azure.storage.blob import (
    BlobBlock,
    BlobServiceClient,
    ContainerClient,
    ContentSettings,
)

from ue_pilot.settings import Settings
from ue_pilot.storage import build_blob_service

BLOCK_SIZE = 4 * 1024 * 1024
MAX_BLOCKS_IN_FLIGHT = 4


class StorageUnavailableError(RuntimeError):
    """Blob Storage cannot be reached or written."""


def build_service(settings: Settings) -> BlobServiceClient:
    try:
        return build_blob_service(
            connection_string=settings.blob_connection_string.get_secret_value(),
            account_url=settings.blob_account_url,
            retry_total=settings.blob_retry_total,
        )
    except ValueError as error:
        raise StorageUnavailableError(
            f"{error}: set UE_BLOB_CONNECTION_STRING or UE_BLOB_ACCOUNT_URL"
        ) from None


def open_container(settings: Settings, create: bool = True) -> ContainerClient:
    """Return the evidence container, created if missing; fail fast if unreachable."""
    container = build_service(settings).get_container_client(settings.blob_container)
    try:
        if create and not container.exists():
            container.create_container()
    except ResourceExistsError:
        pass
    except AzureError as error:
        raise StorageUnavailableError(
            f"Blob Storage unavailable (container {settings.blob_container!r}): "
            f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        ) from None
    return container


class BlockUpload:
    """One blob written block by block, hashed on the way.

    `write` hands a block to a background thread whenever the buffer reaches
    BLOCK_SIZE, so uploading overlaps reading the source. At most
    MAX_BLOCKS_IN_FLIGHT blocks wait in memory. `commit` stages the rest and
    commits with Content-MD5 set, rejecting an existing blob. An upload that
    is never committed publishes nothing.
    """

    def __init__(self, container: ContainerClient, name: str,
                 content_type: str = "application/octet-stream") -> None:
        self.container = container
        self.name = name
        self.content_type = content_type
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5()
        self.size = 0
        self.blocks: list[BlobBlock] = []
        self.buffer = bytearray()
        # Block ids must have one length within a blob; the attempt prefix
        # keeps a retried upload from mixing with blocks of an earlier try.
        self.attempt = uuid.uuid4().hex[:8]
        self._client = container.get_blob_client(name)
        self._pool = ThreadPoolExecutor(max_workers=2)
        self._slots = threading.BoundedSemaphore(MAX_BLOCKS_IN_FLIGHT)
        self._pending: list[Future] = []

    def write(self, data: bytes) -> None:
        self.sha256.update(data)
        self.md5.update(data)
        self.size += len(data)
        self.buffer += data
        while len(self.buffer) >= BLOCK_SIZE:
            self._stage(bytes(self.buffer[:BLOCK_SIZE]))
            del self.buffer[:BLOCK_SIZE]

    def _stage(self, data: bytes) -> None:
        block_id = base64.b64encode(
            f"{self.attempt}-{len(self.blocks):08d}".encode()
        ).decode()
        self.blocks.append(BlobBlock(block_id=block_id))
        self._raise_failed()
        self._slots.acquire()
        future = self._pool.submit(self._client.stage_block, block_id, data)
        future.add_done_callback(lambda _: self._slots.release())
        self._pending.append(future)

    def _raise_failed(self) -> None:
        for future in [f for f in self._pending if f.done()]:
            future.result()
            self._pending.remove(future)

    def close(self) -> None:
        """Stop the uploader threads without committing anything."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def commit(self, metadata: dict[str, str]) -> dict[str, object]:
        try:
            if self.buffer or not self.blocks:
                self._stage(bytes(self.buffer))
                self.buffer.clear()
            for future in self._pending:
                future.result()
        finally:
            self.close()
        settings = ContentSettings(
            content_type=self.content_type, content_md5=bytearray(self.md5.digest())
        )
        self._client.commit_block_list(
            self.blocks,
            content_settings=settings,
            metadata=metadata,
            match_condition=MatchConditions.IfMissing,
        )
        return {
            "blob": self.name,
            "bytes": self.size,
            "sha256": self.sha256.hexdigest(),
            "md5": base64.b64encode(self.md5.digest()).decode(),
        }


def upload_json(container: ContainerClient, name: str, document: dict) -> dict:
    """Upload a JSON document that must not exist yet, with Content-MD5."""
    data = json.dumps(document, indent=2, sort_keys=True).encode()
    md5 = hashlib.md5(data).digest()
    container.get_blob_client(name).upload_blob(
        data,
        overwrite=False,
        content_settings=ContentSettings(
            content_type="application/json", content_md5=bytearray(md5)
        ),
    )
    return {
        "blob": name,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def blob_url(container: ContainerClient, name: str) -> str:
    """Return the blob's URL without any SAS token or key."""
    return container.get_blob_client(name).url.split("?", 1)[0]
