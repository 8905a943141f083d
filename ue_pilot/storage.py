"""Build the Azure Blob Storage client for exports and evidence.

A connection string selects a key-authorized account, which is how the sandbox
and the tests reach Azurite. Without one, the client signs in to the account
URL with DefaultAzureCredential, which uses the first credential in its chain
that works: a managed identity in Azure, or the Azure CLI login on a
workstation.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from azure.core.credentials import AzureNamedKeyCredential, TokenCredential
from azure.storage.blob import BlobServiceClient, ExponentialRetry

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

# The SDK's default retry waits about 18, 24 and 42 s (ExponentialRetry with
# initial_backoff=15, increment_base=3 in azure-storage-blob 12.31), so one
# unreachable account stalls a flow for more than a minute. These retries wait
# about 4, 6 and 10 s, each give or take 1 s.
RETRY_TOTAL = 3
RETRY_INITIAL_BACKOFF = 2
RETRY_INCREMENT_BASE = 2
RETRY_JITTER = 1
# Seconds. The read timeout applies to each chunk read, not to a whole upload.
CONNECTION_TIMEOUT = 10
READ_TIMEOUT = 60


def build_blob_service(
    connection_string: str = "",
    account_url: str = "",
    *,
    credential: TokenCredential | AzureNamedKeyCredential | None = None,
    retry_total: int = RETRY_TOTAL,
) -> BlobServiceClient:
    """Build a BlobServiceClient from a connection string or an account URL.

    The connection string is used when both are set. With only `account_url`,
    `credential` signs the requests, and when it is None DefaultAzureCredential
    does. Tests must pass a connection string or a credential, because
    DefaultAzureCredential probes the managed identity endpoint, a cloud
    metadata address. Raises ValueError when neither a connection string nor
    an account URL is set.
    """
    if connection_string:
        endpoint = _blob_endpoint(connection_string)
        return BlobServiceClient.from_connection_string(
            connection_string, **_client_options(retry_total, endpoint)
        )
    if not account_url:
        raise ValueError(
            "no blob storage account configured: set a connection string "
            "(Azurite's, for local runs) or the account URL "
            "(https://ACCOUNT.blob.core.windows.net)"
        )
    if credential is None:
        # Looked up at call time, so that tests can replace it on azure.identity.
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    return BlobServiceClient(
        account_url, credential=credential, **_client_options(retry_total, account_url)
    )


def _client_options(retry_total: int, endpoint_url: str) -> dict[str, object]:
    """Return the retry, timeout and proxy options shared by both client forms.

    A client for a loopback account ignores HTTP_PROXY and the other proxy
    variables, so that requests meant for Azurite never go to a proxy on
    another host.
    """
    retry = ExponentialRetry(
        initial_backoff=RETRY_INITIAL_BACKOFF,
        increment_base=RETRY_INCREMENT_BASE,
        retry_total=retry_total,
        random_jitter_range=RETRY_JITTER,
    )
    return {
        "retry_policy": retry,
        "connection_timeout": CONNECTION_TIMEOUT,
        "read_timeout": READ_TIMEOUT,
        "use_env_settings": not _is_loopback(endpoint_url),
    }


def _is_loopback(url: str) -> bool:
    return (urlsplit(url).hostname or "") in LOOPBACK_HOSTS


def _blob_endpoint(connection_string: str) -> str:
    """Return the BlobEndpoint of a connection string, or "" when it has none.

    `UseDevelopmentStorage=true` is short for Azurite's default endpoint on
    127.0.0.1:10000.
    """
    fields = dict(
        part.split("=", 1) for part in connection_string.split(";") if "=" in part
    )
    if fields.get("UseDevelopmentStorage", "").lower() == "true":
        return "http://127.0.0.1:10000/devstoreaccount1"
    return fields.get("BlobEndpoint", "")
