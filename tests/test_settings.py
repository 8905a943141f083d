"""Settings: runbook defaults, list parsing and clear errors for bad values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ue_pilot.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in [n for n in __import__("os").environ if n.startswith("UE_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_are_runbook_values():
    """Without configuration the settings carry the runbook's names."""
    settings = Settings()
    assert settings.tenant_setting == "app.org_id"
    assert settings.cross_org_min_role == "admin"
    assert settings.export_paths == ["/api/v2/rewards/export", "/api/v2/tax/cra/export"]
    assert settings.cross_org_paths == [
        "/api/analytics/cross-org",
        "/api/analytics/cross-tenant",
    ]


def test_org_list_from_commas(monkeypatch):
    """UE_PILOT_ORG_IDS takes a comma-separated list."""
    monkeypatch.setenv("UE_PILOT_ORG_IDS", "org_a1, org_b2")
    assert Settings().pilot_org_ids == ["org_a1", "org_b2"]


def test_bad_org_id_named_in_error(monkeypatch):
    """An invalid pilot org id fails with the id in the message."""
    monkeypatch.setenv("UE_PILOT_ORG_IDS", "org_a1,../etc")
    with pytest.raises(ValidationError, match=r"\.\./etc"):
        Settings()


def test_unknown_min_role_rejected(monkeypatch):
    """A minimum role outside the hierarchy is rejected with the hierarchy shown."""
    monkeypatch.setenv("UE_CROSS_ORG_MIN_ROLE", "superadmin")
    with pytest.raises(ValidationError, match="UE_ROLE_HIERARCHY"):
        Settings()


def test_bad_base_url_rejected(monkeypatch):
    """A base URL without a scheme is rejected with the expected form."""
    monkeypatch.setenv("UE_BASE_URL", "ue.example.org")
    with pytest.raises(ValidationError, match="expected http"):
        Settings()


def test_probe_sessions_not_json(monkeypatch):
    """Malformed probe sessions name the setting, never the content."""
    monkeypatch.setenv("UE_PROBE_SESSIONS", "{secret-token")
    with pytest.raises(ValidationError) as error:
        Settings()
    assert "UE_PROBE_SESSIONS" in str(error.value)
    assert "secret-token" not in str(error.value)


def test_public_view_hides_secrets(monkeypatch):
    """The settings recorded as evidence carry no secret value."""
    monkeypatch.setenv("UE_PAGERDUTY_ROUTING_KEY", "rk-123456")
    monkeypatch.setenv("UE_PROBE_SESSIONS", '{"org_a1": {"admin": "tok-abc-123456"}}')
    text = str(Settings().public_view())
    assert "rk-123456" not in text
    assert "tok-abc-123456" not in text


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("UE_CROSS_ORG_PATHS", "", "at least one route"),
        ("UE_EXPORT_PATHS", "/api/x,http://127.0.0.1:9/steal", "invalid route path"),
        ("UE_EXPORT_PATHS", "//evil.example/x", "invalid route path"),
        ("UE_HTTP_CONCURRENCY", "0", "greater than or equal to 1"),
        ("UE_HTTP_TIMEOUT_SECONDS", "0", "greater than 0"),
        ("UE_WINDOW_MINUTES", "-5", "greater than or equal to 1"),
        ("UE_ORG_ID_PATTERN", "[", "invalid regular expression"),
        ("UE_PILOT_ORG_IDS", "org_a1,org_a1", "more than once"),
        ("UE_PILOT_ORG_IDS", "[org_a1", "not a JSON list"),
        ("UE_RLS_CONTEXT_SQL", "SELECT pg_terminate_backend(1)", "set_config"),
        (
            "UE_RLS_CONTEXT_SQL",
            "SELECT set_config('a.b', 'x', true); DROP TABLE t",
            "set_config",
        ),
    ],
    ids=[
        "no-cross-org-paths",
        "absolute-url",
        "scheme-relative",
        "concurrency-0",
        "timeout-0",
        "negative-window",
        "bad-pattern",
        "duplicate-org",
        "broken-json-list",
        "context-sql-other",
        "context-sql-two-statements",
    ],
)
def test_bad_setting_rejected(monkeypatch, name, value, message):
    """Each unsafe or meaningless setting is rejected with the reason."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


@pytest.mark.parametrize(
    "token",
    ["short", "has space inside", "tab\there12", "ünïcode-token", 5, None],
    ids=["short", "space", "tab", "non-ascii", "number", "null"],
)
def test_bad_probe_token_rejected(monkeypatch, token):
    """A token that cannot go into an Authorization header is rejected unseen."""
    import json

    monkeypatch.setenv("UE_PROBE_SESSIONS", json.dumps({"org_a1": {"admin": token}}))
    with pytest.raises(ValidationError) as error:
        Settings()
    assert "role 'admin'" in str(error.value)
    assert str(token) not in str(error.value) or token in (5, None)


def test_static_logs_token_needs_loopback(monkeypatch):
    """A static Logs token is never sent to a non-loopback endpoint."""
    monkeypatch.setenv("UE_LOGS_AUTH", "static")
    monkeypatch.setenv("UE_LOGS_ENDPOINT", "https://api.loganalytics.io")
    with pytest.raises(ValidationError, match="loopback"):
        Settings()


def test_secret_values_cover_url_password(monkeypatch):
    """The password inside the database URL is a secret to redact."""
    monkeypatch.setenv("UE_DATABASE_URL", "postgresql://audit:pw-123456@db:5432/ue")
    assert "pw-123456" in Settings().secret_values()
