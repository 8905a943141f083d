"""Clients of every external system, built in one place from the settings.

Tests point each of them at a local stand-in through the same settings that
point production at Azure, Clerk and PagerDuty.
"""

from __future__ import annotations

import hashlib
import time
from urllib.parse import urlsplit

import httpx
import psycopg
import redis
from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.monitor.query import LogsQueryClient

from ue_pilot import __version__
from ue_pilot.settings import Settings

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class StaticTokenCredential:
    """A fixed bearer token for a Logs API stand-in on loopback.

    DefaultAzureCredential would probe the managed identity metadata address,
    which must never happen outside Azure.
    """

    def __init__(self, token: str) -> None:
        self._token = token

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        return AccessToken(self._token, int(time.time()) + 3600)

    def get_token_info(self, *scopes: str, options: object = None) -> AccessTokenInfo:
        return AccessTokenInfo(self._token, int(time.time()) + 3600)


def is_loopback(url: str) -> bool:
    return (urlsplit(url).hostname or "") in LOOPBACK_HOSTS


def build_http_client(
    settings: Settings,
    user_agent: str | None = None,
    max_connections: int | None = None,
) -> httpx.AsyncClient:
    """Build the client for the UE application's routes.

    Redirects are not followed: a redirect to a login page is a rejection, and
    following it would turn the rejection into a 200.
    """
    connections = max_connections or settings.http_concurrency
    limits = httpx.Limits(
        max_connections=connections, max_keepalive_connections=connections
    )
    return httpx.AsyncClient(
        base_url=settings.base_url,
        timeout=settings.http_timeout_seconds,
        follow_redirects=False,
        limits=limits,
        headers={"User-Agent": user_agent or settings.probe_user_agent},
        trust_env=False,
    )


def build_logs_client(settings: Settings) -> LogsQueryClient:
    """Build the Azure Monitor Logs client, against Azure or the configured endpoint."""
    if settings.logs_auth == "static":
        # Settings validation already limits a static token to loopback.
        credential = StaticTokenCredential(
            settings.logs_static_token.get_secret_value()
        )
    else:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()

    # azure-core's default retries re-send a timed-out query four times; two
    # keep a dead endpoint from holding the audit for many minutes.
    options: dict[str, object] = {"retry_total": 2}
    if settings.logs_endpoint:
        options["endpoint"] = settings.logs_endpoint + "/v1"
    return LogsQueryClient(credential, **options)


def logs_call_options(settings: Settings) -> dict[str, object]:
    """Return per-call options: timeouts, and plain http for a loopback stand-in.

    azure-core rejects bearer tokens over http unless enforce_https is off, and its
    default read timeout of 300 s does not follow the query's server timeout.
    """
    options: dict[str, object] = {
        "connection_timeout": 10,
        "read_timeout": settings.logs_server_timeout_seconds + 30,
    }
    if settings.logs_endpoint.startswith("http://"):
        options["enforce_https"] = False
    return options


def connect_database(settings: Settings) -> psycopg.Connection:
    """Open a connection as the read-only audit role."""
    return psycopg.connect(
        settings.database_url.get_secret_value(),
        connect_timeout=10,
        application_name="ue-pilot-audit",
        autocommit=False,
    )


def build_redis(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_connect_timeout=5,
        socket_timeout=5,
        decode_responses=True,
    )


def build_clerk(settings: Settings):
    """Build the Clerk SDK client, retrying 429 and 5XX responses with backoff.

    The SDK's own default retries only 5XX, for up to an hour. This retries 429
    too, honouring Retry-After, and gives up after `UE_CLERK_RETRY_MAX_SECONDS`.
    `status_codes_override` replaces each operation's list, so 5XX is named again.
    """
    from clerk_backend_api import Clerk
    from clerk_backend_api.utils import BackoffStrategy, RetryConfig

    retry = RetryConfig(
        "backoff",
        BackoffStrategy(
            initial_interval=200,
            max_interval=5_000,
            exponent=1.5,
            max_elapsed_time=int(settings.clerk_retry_max_seconds * 1000),
        ),
        retry_connection_errors=True,
        status_codes_override=["429", "5XX"],
    )
    return Clerk(
        bearer_auth=settings.clerk_secret_key.get_secret_value(),
        server_url=settings.clerk_api_url,
        retry_config=retry,
        timeout_ms=int(settings.http_timeout_seconds * 1000),
    )


def user_agent() -> str:
    return f"ue-pilot/{__version__}"


def probe_agents_key(base_url: str) -> str:
    """Return the Redis key of the probe agents sent to one target.

    The key follows the target, not UE_STATE_PREFIX: every audit of the same
    application leaves the same kind of traffic behind.
    """
    digest = hashlib.sha256(base_url.encode()).hexdigest()[:16]
    return f"ue-pilot:probe-agents:{digest}"


def synthetic_routes_key(base_url: str) -> str:
    """Return the Redis key of the synthetic routes planted in one deployment.

    Onboarding registers each labelled event's route there, and the audit
    leaves out exactly those rows.
    """
    digest = hashlib.sha256(base_url.encode()).hexdigest()[:16]
    return f"ue-pilot:synthetic-routes:{digest}"
