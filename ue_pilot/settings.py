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
            return json.loads(text)
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
    http_timeout_seconds: float = 10.0
    http_concurrency: int = 32

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
    window_minutes: int = Field(60, description="Audit interval covered by one run.")
    window_overlap_minutes: int = Field(
        15, description="How far each window reaches back into the previous one."
    )
    window_max_lookback_minutes: int = 24 * 60
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
    readiness_window_minutes: int = 5
    auth_failure_rate_threshold: float = 0.10
    auth_failure_window_minutes: int = 5
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

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        for org_id in self.pilot_org_ids:
            validate_org_id(org_id, self.org_id_pattern)
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
        return data

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
