"""The ue-pilot command line: exit statuses, usage errors and JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ue_pilot.cli import main

CLI = [sys.executable, "-m", "ue_pilot.cli"]


@pytest.fixture
def runner(monkeypatch, tmp_path):
    for name in [n for n in os.environ if n.startswith("UE_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def test_fault_without_sandbox_is_usage_error(runner):
    """--fault only makes sense with --sandbox."""
    result = runner.invoke(main, ["audit", "--fault", "rls-disabled"])
    assert result.exit_code == 2
    assert "--fault needs --sandbox" in result.output


def test_unknown_fault_is_usage_error(runner):
    """An unknown fault name lists the choices."""
    result = runner.invoke(main, ["audit", "--sandbox", "--fault", "nope"])
    assert result.exit_code == 2
    assert "export-no-auth" in result.output


def test_no_pilot_orgs_is_usage_error(runner):
    """Without UE_PILOT_ORG_IDS the audit names the setting to fix."""
    result = runner.invoke(main, ["audit"])
    assert result.exit_code == 2
    assert "UE_PILOT_ORG_IDS" in result.output


@pytest.mark.parametrize(
    "org",
    ["", "..", "org_*", "org_" + "x" * 80],
    ids=["empty", "dots", "wildcard", "too-long"],
)
def test_bad_org_is_usage_error(runner, monkeypatch, org):
    """A bad --org value is rejected before anything runs."""
    monkeypatch.setenv("UE_PILOT_ORG_IDS", "org_a1")
    result = runner.invoke(main, ["audit", "--org", org])
    assert result.exit_code == 2
    assert "invalid org id" in result.output


def test_org_outside_pilot_is_usage_error(runner, monkeypatch):
    """An --org that is not a pilot org is rejected."""
    monkeypatch.setenv("UE_PILOT_ORG_IDS", "org_a1")
    result = runner.invoke(main, ["audit", "--org", "org_b2"])
    assert result.exit_code == 2
    assert "not a pilot org" in result.output


def test_bad_setting_is_usage_error(runner, monkeypatch):
    """An invalid UE_ setting is reported with its name, and nothing runs."""
    monkeypatch.setenv("UE_PILOT_ORG_IDS", "org_a1")
    monkeypatch.setenv("UE_BASE_URL", "not a url")
    result = runner.invoke(main, ["audit"])
    assert result.exit_code == 2
    assert "base_url" in result.output


def run_cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("UE_", "PREFECT_API"))
    }
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    return subprocess.run(
        CLI + list(args),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )


def test_sandbox_audit_json(tmp_path):
    """`audit --sandbox --json` prints one JSON object and exits 0 on pass."""
    result = run_cli("audit", "--sandbox", "--json", tmp_path=tmp_path)
    output = json.loads(result.stdout)
    assert result.returncode == 0, result.stderr[-2000:]
    assert output["verdict"] == "pass"
    assert set(output["checks"][0]) == {"id", "org", "status", "observed"}


def test_sandbox_fault_exit_status(tmp_path):
    """A failing audit exits 1 and its summary names the failing check."""
    result = run_cli(
        "audit", "--sandbox", "--fault", "rls-fail-open", tmp_path=tmp_path
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Isolation audit: FAIL" in result.stdout
    assert "rls.fail_open" in result.stdout


def test_inconclusive_exit_status(tmp_path):
    """An audit without telemetry exits 3."""
    result = run_cli(
        "audit", "--sandbox", "--fault", "no-telemetry", "--json", tmp_path=tmp_path
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert json.loads(result.stdout)["verdict"] == "inconclusive"
