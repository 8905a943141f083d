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
    monkeypatch.setenv("UE_PROBE_SESSIONS", '{"org_a1": {"admin": "tok-abc"}}')
    text = str(Settings().public_view())
    assert "rk-123456" not in text
    assert "tok-abc" not in text
