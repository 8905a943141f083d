"""Fault switches of the sandbox pilot: each one a flaw a real deployment can have."""

from __future__ import annotations

FAULTS: dict[str, str] = {
    "export-no-auth": "export routes serve rows without a session",
    "export-ignores-org": "a session of one org gets another org's export rows",
    "cross-org-no-role-gate": "cross-org analytics routes admit every role",
    "rls-disabled": "a tenant table has row-level security disabled",
    "rls-not-forced": "the application role owns a tenant table without FORCE",
    "rls-fail-open": "a permissive policy passes every row when the setting is empty",
    "rls-session-set": "the tenant context is set per session and leaks through the pool",
    "cross-org-events": "telemetry records queries whose context org differs from the request's",
    "no-telemetry": "the application emits no custom events or metrics",
    "readiness-down": "the readiness route fails and the availability test records it",
    "ready-requires-auth": "the readiness route sits behind auth and rejects anonymous probes",
    "slow-proxy": "the Django proxy latency p99 is above 3 s",
    "auth-failure-storm": "more than 10 % of requests fail authentication",
    "logs-partial": "the Logs query API returns partial results with an error",
    "telemetry-ingest-drops": (
        "the Application Insights ingestion endpoint accepts items but never stores them"
    ),
    "export-truncated": (
        "the first 2 export responses per route end partway, like a proxy timeout"
    ),
    "export-cross-org-row": (
        "each export includes one row of another org, as a missing tenant filter would"
    ),
    "export-page-drift": (
        "JSON pages after the first shift by one row, so one id repeats and one is lost"
    ),
    "export-formula-cells": (
        "some reward descriptions start with =, +, -, @, tab or CR, as user input may"
    ),
    "storage-unavailable": "the Blob Storage account in the settings cannot be reached",
    "blob-copy-fails": (
        "every Copy Blob request to the storage account fails with 500 InternalError"
    ),
    "clerk-rate-limited": (
        "every third Clerk Backend API request gets 429 with Retry-After: 1"
    ),
    "session-survives-revoke": (
        "Clerk returns a revoked session as revoked but keeps it active"
    ),
}


class UnknownFaultError(ValueError):
    """A fault name the sandbox does not have."""


def validate_faults(names: list[str] | tuple[str, ...]) -> list[str]:
    """Return the fault names in order, raising UnknownFaultError for a bad one."""
    for name in names:
        if name not in FAULTS:
            known = ", ".join(sorted(FAULTS))
            raise UnknownFaultError(f"unknown fault {name!r}; known faults: {known}")
    return list(dict.fromkeys(names))
