"""Removal of secret values from text that leaves the process.

Error messages of libraries can quote their input: libpq quotes a malformed
connection URI with its password, httpx quotes an invalid header value with
its token. Every check result, artifact, page and log line of a flow passes
through here, so a secret that slips into one is replaced before it is stored.
"""

from __future__ import annotations

import json
import logging

from ue_pilot.checks import CheckResult

MASK = "[redacted]"


def redact_text(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_check(check: CheckResult, secrets: list[str]) -> CheckResult:
    """Return `check` with every secret value masked in its summary and observed."""
    observed = json.loads(redact_text(json.dumps(check.observed, default=str), secrets))
    return CheckResult(
        check.id, check.status, observed, check.org, redact_text(check.summary, secrets)
    )


def redact_checks(checks: list[CheckResult], secrets: list[str]) -> list[CheckResult]:
    """Return `checks` with secrets masked, scanning all of them in one pass first.

    Secrets are rare in results, so one scan of the whole list usually shows
    that nothing needs rewriting.
    """
    text = json.dumps([c.to_dict() for c in checks], default=str)
    if not any(secret in text for secret in secrets):
        return checks
    return [redact_check(check, secrets) for check in checks]


class RedactingFilter(logging.Filter):
    """Mask secret values in log records before any handler receives them."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact_text(message, self.secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


def install_log_redaction(secrets: list[str]) -> None:
    """Mask `secrets` in every record of Prefect's flow and task run loggers."""
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect"):
        logger = logging.getLogger(name)
        for existing in [f for f in logger.filters if isinstance(f, RedactingFilter)]:
            logger.removeFilter(existing)
        logger.addFilter(RedactingFilter(secrets))
