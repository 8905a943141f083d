"""Notices to a pilot org's contact, sent as JSON to a webhook.

The webhook URL (`UE_NOTIFY_WEBHOOK_URL`) is a secret: chat and incident
webhooks carry their credential in the URL, so it never appears in a log, an
error or a result. Each notice carries an `Idempotency-Key` header, because a
run killed after sending and before recording it sends the notice again.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ue_pilot.settings import Settings

NOTIFY_TIMEOUT_SECONDS = 15.0


NO_CONTACT_MESSAGE = (
    "no contact configured: set UE_NOTIFY_WEBHOOK_URL to the webhook of the "
    "pilot org's contact, or UE_NOTIFY_REQUIRED=false to roll back without notice"
)


class NotificationError(RuntimeError):
    """The notice could not be delivered, or no webhook is configured."""


def webhook_url(settings: Settings) -> str:
    """Return the configured webhook URL, "" when none is set."""
    url = settings.notify_webhook_url.get_secret_value().strip()
    if url and urlsplit(url).scheme not in ("http", "https"):
        raise NotificationError(
            "invalid UE_NOTIFY_WEBHOOK_URL: expected an http(s) URL"
        )
    return url


@task(
    name="notify-org-contact",
    retries=2,
    retry_delay_seconds=[5, 20],
    cache_policy=NO_CACHE,
)
def notify_org_contact(settings: Settings, notice: dict, idempotency_key: str) -> dict:
    """POST `notice` to the webhook and return the outcome for the evidence.

    Without a webhook the step fails, unless UE_NOTIFY_REQUIRED=false, which
    records "no contact configured" and lets the rollback go on.
    """
    logger = get_run_logger()
    url = webhook_url(settings)
    if not url:
        if settings.notify_required:
            raise NotificationError(NO_CONTACT_MESSAGE)
        logger.warning("org %s: no contact configured, no notice sent", notice["org"])
        return {"outcome": "skipped", "reason": "no contact configured"}

    try:
        response = httpx.post(
            url,
            json=notice,
            headers={"Idempotency-Key": idempotency_key},
            timeout=NOTIFY_TIMEOUT_SECONDS,
            follow_redirects=False,
            trust_env=False,
        )
    except httpx.HTTPError as error:
        # The message of an httpx error can quote the URL, which is secret.
        raise NotificationError(
            f"notice to the org contact failed: {type(error).__name__}"
        ) from None
    if not response.is_success:
        raise NotificationError(
            f"notice to the org contact rejected: HTTP {response.status_code}"
        )
    logger.info(
        "org %s: contact notified (HTTP %d)", notice["org"], response.status_code
    )
    return {"outcome": "sent", "http_status": response.status_code}
