"""Settings of the pilot operations tool, read from `UE_*` variables and `.env`.

Every name the runbook assumes about the Union-Eyes deployment is a setting
whose default is the runbook's value, because the real application differs
from the runbook (tenant setting name, routes, telemetry schema, roles).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ue_pilot.orgids import validate_org_id

RUNBOOK_READINESS_TEST = "ue-ready"


def _split_list(value: object) -> object:
    """Accept a comma-separated string or a JSON list for list settings."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                raise ValueError(
                    "not a JSON list; give a comma-separated list or a JSON list "
                    'such as ["a", "b"]'
                ) from None
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Settings of the audited deployment and of the runbook's assumptions about it."""

    model_config = SettingsConfigDict(
        env_prefix="UE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        # Validation errors would otherwise echo every input, secrets included.
        hide_input_in_errors=True,
    )

    # The application under audit.
    base_url: str = Field(
        "http://127.0.0.1:3000",
        description="Base URL of the UE web application (the runbook's <UE_HOST>).",
    )
    pilot_org_ids: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Clerk organization ids of the pilot orgs, comma-separated.",
    )
    org_id_pattern: str = Field(
        r"^org_[A-Za-z0-9]{1,60}$",
        description="Regular expression every org id must match (Clerk's org_ ids).",
    )
    ready_path: str = "/api/ready"
    health_path: str = "/api/health"
    export_paths: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["/api/v2/rewards/export", "/api/v2/tax/cra/export"],
    )
    export_format: Literal["csv", "json"] = Field(
        "csv",
        description="csv, or json paged as {count, next, previous, results}.",
    )
    export_org_field: str = Field(
        "org_id", description="Column or field of an exported row naming its org."
    )
    cross_org_paths: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [
            "/api/analytics/cross-org",
            "/api/analytics/cross-tenant",
        ],
    )
    role_hierarchy: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["member", "admin", "owner"],
        description="Org roles from lowest to highest.",
    )
    cross_org_min_role: str = Field(
        "admin", description="Lowest role the cross-org routes may admit."
    )
    probe_sessions: SecretStr = Field(
        SecretStr("{}"),
        description='JSON {"<org id>": {"<role>": "<session token>"}} of probe identities.',
    )
    probe_user_agent: str = Field(
        "ue-pilot-audit/1",
        description="User-Agent of the audit's probes; monitors leave these requests out.",
    )
    http_timeout_seconds: float = Field(10.0, gt=0)
    http_concurrency: int = Field(32, ge=1, le=1024)

    # Telemetry (Azure Monitor Logs).
    logs_resource_id: str = Field(
        "",
        description="Application Insights resource id; queries use its classic tables.",
    )
    logs_workspace_id: str = Field(
        "", description="Log Analytics workspace id, used when no resource id is set."
    )
    logs_schema: Literal["classic", "workspace"] = Field(
        "classic",
        description="classic (customEvents, timestamp) or workspace (AppEvents, TimeGenerated).",
    )
    logs_endpoint: str = Field(
        "", description="Endpoint override for the Logs query API (empty: Azure's)."
    )
    logs_auth: Literal["default", "static"] = Field(
        "default",
        description="default: DefaultAzureCredential. static: a fixed token, loopback only.",
    )
    logs_static_token: SecretStr = SecretStr("")
    logs_server_timeout_seconds: int = 60
    window_minutes: int = Field(
        60, ge=1, description="Audit interval covered by one run."
    )
    window_overlap_minutes: int = Field(
        15, ge=0, description="How far each window reaches back into the previous one."
    )
    telemetry_max_age_minutes: int = Field(
        20,
        ge=1,
        description="Liveness fails when the newest expected row is older than this.",
    )
    window_max_lookback_minutes: int = Field(24 * 60, ge=1)
    readiness_test_name: str = Field(
        RUNBOOK_READINESS_TEST,
        description="availabilityResults test name of the readiness probe.",
    )
    liveness_events: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["rls_context_set", "auth_success"],
    )
    liveness_metrics: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["ue_query_total"],
    )
    proxy_latency_metric: str = "ue_django_proxy_latency_ms"
    rls_mismatch_metric: str = "ue_rls_context_mismatch"
    export_unauthenticated_metric: str = "ue_export_unauthenticated"
    query_total_metric: str = "ue_query_total"
    readiness_failures_threshold: int = 3
    readiness_window_minutes: int = Field(5, ge=1)
    auth_failure_rate_threshold: float = Field(0.10, ge=0, le=1)
    auth_failure_window_minutes: int = Field(5, ge=1)
    proxy_latency_p99_threshold_ms: float = 3000.0

    # PostgreSQL.
    database_url: SecretStr = Field(
        SecretStr("postgresql://ue_audit@127.0.0.1:5432/ue"),
        description="Connection URL of the read-only audit role.",
    )
    db_app_role: str = Field("ue_app", description="Role the application connects as.")
    tenant_setting: str = Field(
        "app.org_id", description="Tenant context setting name."
    )
    db_org_column: str = Field("org_id", description="Column naming a row's org.")
    db_schemas: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["public"]
    )
    rls_context_sql: str = Field(
        "SELECT set_config(%(setting)s, %(org)s, true)",
        description="Statement the application sets the tenant context with.",
    )
    db_connections_max_ratio: float = 0.8

    # Exports and Blob Storage.
    export_names: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["rewards", "tax-cra"],
        description="File name of each export route, in the order of UE_EXPORT_PATHS.",
    )
    export_session_role: str = Field(
        "admin", description="Role of the probe session that fetches full exports."
    )
    blob_connection_string: SecretStr = Field(
        SecretStr(""), description="Storage connection string (Azurite locally)."
    )
    blob_account_url: str = Field(
        "", description="Storage account URL, signed in with DefaultAzureCredential."
    )
    blob_container: str = "evidence"
    blob_retry_total: int = Field(
        3, ge=0, description="Retries of each Blob Storage request (about 4, 6, 10 s)."
    )

    # Clerk (identity provider).
    clerk_api_url: str = Field(
        "https://api.clerk.com/v1", description="Clerk Backend API base URL."
    )
    clerk_secret_key: SecretStr = Field(
        SecretStr(""), description="Clerk secret key (sk_live_...)."
    )
    clerk_status_key: str = Field(
        "ue_pilot_status",
        description="Public metadata key of an org's pilot status, which UE honours.",
    )
    clerk_retry_max_seconds: float = Field(
        30.0,
        gt=0,
        description="Seconds that Clerk requests retry 429 and 5XX responses.",
    )

    # Onboarding.
    onboarding_created_by: str = Field(
        "", description="Clerk user id recorded as the creator of onboarded orgs."
    )
    seed_scripts_dir: str = Field(
        "", description="Folder of the new org's seed scripts (*.sql, in name order)."
    )
    seed_database_url: SecretStr = Field(
        SecretStr(""),
        description="Connection URL the seed scripts run with, as UE_DB_APP_ROLE.",
    )
    appinsights_connection_string: SecretStr = Field(
        SecretStr(""),
        description="Application Insights connection string; onboarding sends its "
        "synthetic test event with it.",
    )
    probe_session_issuer_url: str = Field(
        "",
        description="Sandbox only: loopback route that issues probe sessions for a "
        "new org. Elsewhere the new org's sessions come from UE_PROBE_SESSIONS.",
    )
    onboarding_detection_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="Seconds onboarding waits for its synthetic event to show in "
        "the Logs query (ingestion takes minutes in Azure).",
    )

    # Rollback.
    rollback_approval_timeout_seconds: int = Field(
        3600, gt=0, description="Seconds a rollback waits for approval before failing."
    )
    rollback_telemetry_wait_seconds: float = Field(
        900.0,
        ge=0,
        description="Maximum seconds the session check waits for telemetry newer "
        "than the disable.",
    )
    rollback_telemetry_poll_seconds: float = Field(
        30.0, gt=0, description="Seconds between two of those telemetry queries."
    )
    notify_webhook_url: SecretStr = Field(
        SecretStr(""),
        description="Webhook that receives the rollback notice for the org contact.",
    )
    notify_required: bool = Field(
        True, description="Fail the rollback when UE_NOTIFY_WEBHOOK_URL is not set."
    )
    pilot_status_blob: str = Field(
        "pilot-status.json",
        description="Blob of the pilot status document in UE_BLOB_CONTAINER.",
    )

    # Redis, paging, state.
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    pagerduty_routing_key: SecretStr = SecretStr("")
    pagerduty_events_url: str = "https://events.pagerduty.com/v2/enqueue"
    pagerduty_source: str = "ue-pilot-audit"
    state_prefix: str = Field(
        "ue-pilot", description="Prefix of the Redis keys the audit keeps state in."
    )

    @field_validator(
        "pilot_org_ids",
        "export_paths",
        "cross_org_paths",
        "role_hierarchy",
        "liveness_events",
        "liveness_metrics",
        "db_schemas",
        "export_names",
        mode="before",
    )
    @classmethod
    def _parse_list(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("base_url", "pagerduty_events_url", "logs_endpoint")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(
                f"invalid URL {value!r}: expected http(s)://host[:port][/path]"
            )
        return value.rstrip("/")

    @field_validator("probe_session_issuer_url")
    @classmethod
    def _check_issuer_url(cls, value: str) -> str:
        # The issuer hands out sessions for any org, so it must be a local sandbox.
        host = value.removeprefix("http://").split("/")[0].rsplit(":", 1)[0]
        loopback = value.startswith("http://") and host in (
            "127.0.0.1", "localhost", "[::1]"
        )
        if value and not loopback:
            raise ValueError(
                f"invalid UE_PROBE_SESSION_ISSUER_URL {value!r}: only a loopback "
                "http:// URL of the sandbox is allowed; elsewhere leave it empty and "
                "list the new org's sessions in UE_PROBE_SESSIONS"
            )
        return value.rstrip("/")

    @field_validator("org_id_pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"invalid regular expression {value!r}: {error}") from None
        return value

    @field_validator("export_paths", "cross_org_paths", "ready_path", "health_path")
    @classmethod
    def _check_paths(cls, value: list[str] | str) -> list[str] | str:
        paths = value if isinstance(value, list) else [value]
        if not paths:
            raise ValueError("empty: at least one route path is needed")
        for path in paths:
            # Probe sessions are sent to these paths, so they must stay on
            # UE_BASE_URL: no scheme, no host, no "//" start.
            if not re.fullmatch(r"/(?!/)[A-Za-z0-9._~!$&'()*+,;=:@%/-]*", path):
                raise ValueError(
                    f"invalid route path {path!r}: expected a path on UE_BASE_URL "
                    "such as /api/v2/rewards/export"
                )
        return value

    @field_validator("rls_context_sql")
    @classmethod
    def _check_context_sql(cls, value: str) -> str:
        # The audit runs this statement as the application role; anything but
        # one set_config call could do harm even in a READ ONLY transaction.
        if ";" in value or not re.match(r"^\s*select\s+set_config\s*\(", value, re.I):
            raise ValueError(
                f"invalid UE_RLS_CONTEXT_SQL {value!r}: expected one "
                "SELECT set_config(%(setting)s, %(org)s, true|false) statement"
            )
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        for org_id in self.pilot_org_ids:
            validate_org_id(org_id, self.org_id_pattern)
        duplicates = sorted({o for o in self.pilot_org_ids
                             if self.pilot_org_ids.count(o) > 1})
        if duplicates:
            raise ValueError(
                f"UE_PILOT_ORG_IDS lists {duplicates} more than once; list each "
                "org once"
            )
        if self.logs_auth == "static":
            host = re.sub(r"^https?://", "", self.logs_endpoint).split("/")[0]
            if host.rsplit(":", 1)[0] not in ("127.0.0.1", "localhost", "[::1]"):
                raise ValueError(
                    "UE_LOGS_AUTH=static is only allowed with a loopback "
                    f"UE_LOGS_ENDPOINT (got {self.logs_endpoint!r}); use "
                    "UE_LOGS_AUTH=default against Azure"
                )
        if self.cross_org_min_role not in self.role_hierarchy:
            raise ValueError(
                f"UE_CROSS_ORG_MIN_ROLE={self.cross_org_min_role!r} is not in "
                f"UE_ROLE_HIERARCHY={self.role_hierarchy}; add it or pick one of them"
            )
        if not re.match(
            r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$", self.tenant_setting
        ):
            raise ValueError(
                f"invalid UE_TENANT_SETTING {self.tenant_setting!r}: expected a "
                "custom setting name such as app.org_id"
            )
        if len(self.export_names) != len(self.export_paths):
            raise ValueError(
                f"UE_EXPORT_NAMES has {len(self.export_names)} names but "
                f"UE_EXPORT_PATHS has {len(self.export_paths)} routes; give one "
                "name per route"
            )
        for name in self.export_names:
            if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", name):
                raise ValueError(
                    f"invalid export name {name!r} in UE_EXPORT_NAMES: use "
                    "lowercase letters, digits and dashes"
                )
        self.probe_session_map()
        return self

    def export_routes(self) -> dict[str, str]:
        """Return {export name: route path}."""
        return dict(zip(self.export_names, self.export_paths))

    def probe_session_map(self) -> dict[str, dict[str, str]]:
        """Parse the probe identities into {org: {role: token}}."""
        try:
            data = json.loads(self.probe_sessions.get_secret_value() or "{}")
        except json.JSONDecodeError as error:
            raise ValueError(
                "invalid UE_PROBE_SESSIONS: not JSON "
                f"(line {error.lineno}, column {error.colno}); expected "
                '{"<org id>": {"<role>": "<token>"}}'
            ) from None
        if not isinstance(data, dict) or not all(
            isinstance(roles, dict) for roles in data.values()
        ):
            raise ValueError(
                'invalid UE_PROBE_SESSIONS: expected {"<org id>": {"<role>": "<token>"}}'
            )
        for org, roles in data.items():
            for role, token in roles.items():
                # A token goes into an Authorization header: visible ASCII only.
                if not isinstance(token, str) or not re.fullmatch(r"[!-~]{8,4096}", token):
                    raise ValueError(
                        f"invalid UE_PROBE_SESSIONS token for org {org!r} role "
                        f"{role!r}: expected 8 or more visible ASCII characters"
                    )
        return data

    def secret_values(self) -> list[str]:
        """Return every secret string, longest first, for redaction."""
        values = [
            getattr(self, name).get_secret_value()
            for name, field in type(self).model_fields.items()
            if field.annotation is SecretStr
        ]
        for url in (self.database_url, self.redis_url, self.seed_database_url):
            password = re.search(r"://[^:/@]*:([^@]+)@", url.get_secret_value())
            if password:
                values.append(password.group(1))
        ikey = re.search(
            r"InstrumentationKey=([^;]+)",
            self.appinsights_connection_string.get_secret_value(),
            re.I,
        )
        if ikey:
            values.append(ikey.group(1).strip())
        try:
            values += [t for roles in self.probe_session_map().values()
                       for t in roles.values()]
        except ValueError:
            pass
        return sorted({v for v in values if len(v) >= 6}, key=len, reverse=True)

    def roles_below(self, role: str) -> list[str]:
        """Return the roles ranked below `role` in the hierarchy."""
        return self.role_hierarchy[: self.role_hierarchy.index(role)]

    def public_view(self) -> dict[str, object]:
        """Return the settings with every secret left out, for evidence."""
        data = self.model_dump(mode="json")
        for name, field in type(self).model_fields.items():
            if field.annotation is SecretStr:
                data[name] = (
                    "(secret)" if getattr(self, name).get_secret_value() else ""
                )
        return data


class FlowRunSettings(BaseSettings):
    """Settings read when a flow module is imported or a deployment is built.

    They are kept apart from `Settings` so that importing a flow validates only
    these fields. An invalid audit setting then fails the flow run, with the
    error in its log, instead of the import of the flow.
    """

    model_config = SettingsConfigDict(
        env_prefix="UE_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    schedule_timezone: str = Field(
        "UTC", description="IANA timezone of the audit's hourly cron."
    )
    result_storage_path: str = Field(
        ".prefect/results",
        description="Folder of flow results, relative to the working directory, "
        "used when UE_RESULT_STORAGE_BLOCK is empty.",
    )
    result_storage_block: str = Field(
        "",
        description="Name of a saved prefect-azure AzureBlobStorageContainer block "
        "that stores flow results instead of the folder.",
    )
    audit_timeout_seconds: float = Field(
        1800, gt=0, description="Time limit of one isolation-audit run."
    )
    export_timeout_seconds: float = Field(
        4 * 3600, gt=0, description="Time limit of one export-all run."
    )
    onboarding_timeout_seconds: float = Field(
        3600, gt=0, description="Time limit of one onboarding run."
    )
    rollback_timeout_seconds: float = Field(
        6 * 3600,
        gt=0,
        description="Time limit of one rollback run, its export included.",
    )

    @field_validator("schedule_timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown timezone {value!r} in UE_SCHEDULE_TIMEZONE: use an IANA "
                "name such as UTC or America/Toronto"
            ) from None
        return value

    @field_validator("result_storage_block")
    @classmethod
    def _check_block_name(cls, value: str) -> str:
        if value and not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,99}", value):
            raise ValueError(
                f"invalid block name {value!r} in UE_RESULT_STORAGE_BLOCK: Prefect "
                "block names use lowercase letters, digits and dashes"
            )
        return value
