"""A rollback started and approved in the Prefect UI, in headless Chromium.

`ue-pilot serve` runs every deployment and its own Prefect server against a
sandbox with Azurite. The browser starts the rollback deployment with a custom
run, waits until the run pauses, fills in the Resume form and waits until the
run completes. The Prefect API, the Clerk stand-in and Azurite then show what
the rollback did. Screenshots of each step go to the test's temporary folder,
and their paths are printed when the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from browser import local_page
from playwright.sync_api import expect
from test_rollback import (
    ActiveOrgTraffic,
    active_sessions,
    blob_names,
    clerk_org,
    container,
    notifications,
    status_document,
)

from flows.rollback import is_evidence_blob
from ue_pilot.sandbox.runner import SandboxProcess
from ue_pilot.sandbox.servers import find_free_port

# Starting serve, loading the UI pages and running the rollback took 1.5 to 3
# minutes on 2 cores shared with other test runs. The timeout leaves room.
pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parent.parent
ORG = "org_sandbox0001"
ORG_ACTIVE = "org_sandbox0002"  # keeps signing in, so telemetry passes the disable
REQUESTER = "Rita Requester"
APPROVER = "Alex Approver"
REASON = "pilot ended, started in the browser"
COMMENT = "plan checked in the Prefect UI"
SERVE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "UE_ROLLBACK_TELEMETRY_POLL_SECONDS": "2",
    "UE_ROLLBACK_TELEMETRY_WAIT_SECONDS": "300",
    "UE_ROLLBACK_APPROVAL_TIMEOUT_SECONDS": "600",
}
SERVE_START_SECONDS = 300
PAUSE_SECONDS = 240
COMPLETE_SECONDS = 420
# Milliseconds a page element may take to appear: the UI bundle loads slowly on
# busy cores, and the UI polls the API for state changes.
UI_TIMEOUT_MS = 120_000
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# Waits while a page is open go through Playwright. Its sync API runs the route
# handler, which lets each page request through, only inside a Playwright call.
# A time.sleep would hold every request of the UI until the next such call.
Pause = Callable[[float], None]


# Serve and the Prefect API


def start_serve(port: int, home: Path, sandbox_env: dict[str, str]) -> subprocess.Popen:
    """Start `ue-pilot serve` with the sandbox's settings and a fresh PREFECT_HOME."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("UE_", "PREFECT_"))}
    env |= sandbox_env | SERVE_ENV | {
        "PREFECT_HOME": str(home),
        "UE_RESULT_STORAGE_PATH": str(home / "results"),
    }
    with open(home / "serve.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "ue_pilot.cli", "serve", "--port", str(port)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop_serve(process: subprocess.Popen) -> None:
    """Stop serve with SIGTERM, so it pauses its deployments before its server stops."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(180)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_deployment(api: httpx.Client, process: subprocess.Popen) -> dict:
    """Poll the API until serve has registered the rollback deployment."""
    deadline = time.monotonic() + SERVE_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ue-pilot serve exited with status {process.returncode}")
        try:
            response = api.get("/deployments/name/rollback/on-demand")
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code == 200:
            return response.json()
        time.sleep(2)
    pytest.fail(f"deployment rollback/on-demand did not appear within "
                f"{SERVE_START_SECONDS} s")


def find_run_by_name(api: httpx.Client, name: str, pause: Pause) -> dict:
    """Return the flow run named `name`, polling until the UI's submit created it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        runs = api.post("/flow_runs/filter",
                        json={"flow_runs": {"name": {"any_": [name]}}}).json()
        if runs:
            return runs[0]
        pause(1)
    pytest.fail(f"no flow run named {name!r} 60 s after Submit")


def wait_for_state(api: httpx.Client, run_id: str, wanted: str, seconds: float,
                   pause: Pause) -> dict:
    """Poll the flow run until its state type is `wanted`, failing on any other end."""
    deadline = time.monotonic() + seconds
    state: dict = {}
    while time.monotonic() < deadline:
        state = api.get(f"/flow_runs/{run_id}").json()["state"] or {}
        if state.get("type") == wanted:
            return state
        if state.get("type") in FINAL_STATES:
            pytest.fail(f"flow run {run_id} ended {state['name']} "
                        f"({state.get('message')}) while waiting for {wanted}")
        pause(2)
    pytest.fail(f"flow run {run_id} is still {state.get('name')} after {seconds:.0f} "
                f"s; expected {wanted}")


def read_artifact(api: httpx.Client, run_id: str, key: str) -> str:
    """Return the latest markdown of the run's artifact `key`, or "" without one."""
    artifacts = api.post("/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": [key]}},
        "sort": "CREATED_DESC",
    }).json()
    return artifacts[0]["data"] if artifacts else ""


# The browser


@dataclass
class Screenshots:
    """Full-page screenshots of one page, numbered in the order they were taken."""

    page: object
    folder: Path
    paths: list[Path] = field(default_factory=list)

    def take(self, name: str) -> None:
        path = self.folder / f"{len(self.paths) + 1:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        self.paths.append(path)


@contextmanager
def shown_on_failure(screens: Screenshots, serve_log: Path) -> Iterator[None]:
    """On any failure take a last screenshot and print every screenshot's path."""
    try:
        yield
    except BaseException:
        try:
            screens.take("failure")
        except Exception as error:  # the page itself may be what broke
            print(f"no failure screenshot: {error}")
        print("Screenshots:", *[str(path) for path in screens.paths], sep="\n  ")
        print(f"serve log: {serve_log}")
        raise


def start_custom_run(page, screens: Screenshots, run_name: str) -> None:
    """Open the rollback deployment, fill in a custom run and submit it."""
    row = page.get_by_role("row").filter(
        has=page.get_by_role("link", name="rollback", exact=True)
    )
    row.get_by_role("link", name="on-demand").click(timeout=UI_TIMEOUT_MS)
    run_button = page.get_by_role("button", name="Run", exact=True)
    run_button.wait_for(timeout=UI_TIMEOUT_MS)
    screens.take("deployment")

    run_button.click()
    page.get_by_role("menuitem", name="Custom run").click()
    # The form sets a generated run name once it has loaded, replacing any text
    # typed before, so typing starts only after that name is shown.
    name_box = page.get_by_label("Run Name")
    expect(name_box).not_to_have_value("", timeout=UI_TIMEOUT_MS)
    fields = [
        (name_box, run_name),
        (page.get_by_label("org_id", exact=True), ORG),
        (page.get_by_label("reason", exact=True), REASON),
        (page.get_by_label("requested_by", exact=True), REQUESTER),
    ]
    for box, value in fields:
        box.fill(value)
    for box, value in fields:
        expect(box).to_have_value(value)
    screens.take("custom-run")
    page.get_by_role("button", name="Submit").click()


def approve_in_resume_form(page, screens: Screenshots) -> None:
    """Open the paused run's Resume form, type the approval and submit it."""
    page.get_by_role("button", name="Open menu").first.click()
    page.get_by_role("menuitem", name="Resume").click()
    dialog = page.get_by_role("dialog", name="Resume Flow Run")
    fields = [
        (dialog.get_by_label("Org id (type it exactly)"), ORG),
        (dialog.get_by_label("Approver name"), APPROVER),
        (dialog.get_by_label("Comment"), COMMENT),
    ]
    for box, value in fields:
        box.fill(value)
    for box, value in fields:
        expect(box).to_have_value(value)
    screens.take("resume-form")
    dialog.get_by_role("button", name="Resume").click()
    dialog.wait_for(state="hidden", timeout=UI_TIMEOUT_MS)


def wait_for_text(page, text: str) -> None:
    page.get_by_text(text, exact=True).first.wait_for(timeout=UI_TIMEOUT_MS)


@dataclass
class BrowserRollback:
    """What the browser did and saw, and the run it started."""

    run_id: str
    run_url: str
    deployment: dict
    run: dict
    final_state: dict
    approval: str
    blocked: list[str]
    loaded: list[str]
    screenshots: list[Path]


def roll_back_in_browser(api: httpx.Client, base_url: str, deployment: dict,
                         folder: Path, serve_log: Path) -> BrowserRollback:
    """Start, approve and follow one rollback in the Prefect UI until it completes."""
    run_name = f"browser-rollback-{uuid.uuid4().hex[:8]}"
    blocked: list[str] = []
    loaded: list[str] = []
    with local_page(blocked) as page:
        page.context.on("response", lambda response: loaded.append(response.url))
        page.on("websocket", lambda socket: loaded.append(socket.url))
        screens = Screenshots(page, folder)

        def pause(seconds: float) -> None:
            page.wait_for_timeout(seconds * 1000)

        with shown_on_failure(screens, serve_log):
            page.goto(f"{base_url}/v2/deployments")
            start_custom_run(page, screens, run_name)
            view_run = page.get_by_role("button", name="View run")
            view_run.wait_for(timeout=UI_TIMEOUT_MS)
            run = find_run_by_name(api, run_name, pause)
            view_run.click()
            page.wait_for_url(f"**/v2/runs/flow-run/{run['id']}**",
                              timeout=UI_TIMEOUT_MS)
            run_url = page.url

            wait_for_state(api, run["id"], "PAUSED", PAUSE_SECONDS, pause)
            wait_for_text(page, "Paused")
            screens.take("paused")
            approve_in_resume_form(page, screens)

            final_state = wait_for_state(api, run["id"], "COMPLETED",
                                         COMPLETE_SECONDS, pause)
            wait_for_text(page, "Completed")
            screens.take("completed")
    approval = read_artifact(api, run["id"], "rollback-approval")
    return BrowserRollback(run["id"], run_url, deployment, run, final_state,
                           approval, blocked, loaded, screens.paths)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxProcess]:
    with SandboxProcess(orgs=2, storage=True) as running:
        with ActiveOrgTraffic(running.env, ORG_ACTIVE):
            yield running


@pytest.fixture(scope="module")
def rolled_back(sandbox, tmp_path_factory) -> Iterator[BrowserRollback]:
    """One rollback of ORG started and approved in the browser, served by serve."""
    home = tmp_path_factory.mktemp("serve")
    port = find_free_port()
    process = start_serve(port, home, sandbox.env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=f"{base_url}/api", trust_env=False,
                          timeout=30) as api:
            deployment = wait_for_deployment(api, process)
            yield roll_back_in_browser(api, base_url, deployment,
                                       tmp_path_factory.mktemp("screenshots"),
                                       home / "serve.log")
    finally:
        stop_serve(process)


# The run in the Prefect UI


def test_browser_rollback_completes(rolled_back):
    """The run started in the UI and approved in its Resume form completed."""
    assert rolled_back.final_state["type"] == "COMPLETED"


def test_browser_rollback_runs_deployment(rolled_back):
    """The run belongs to the rollback deployment and has the typed parameters."""
    assert rolled_back.run["deployment_id"] == rolled_back.deployment["id"]
    assert rolled_back.run["parameters"] == {
        "org_id": ORG, "reason": REASON, "requested_by": REQUESTER, "dry_run": False,
    }


def test_browser_rollback_opens_run_page(rolled_back):
    """The UI's "View run" led to the v2 page of the run it started."""
    path = urlsplit(rolled_back.run_url).path
    assert path == f"/v2/runs/flow-run/{rolled_back.run_id}"


def test_browser_rollback_records_typed_approval(rolled_back, sandbox):
    """The approval the browser typed reached the flow and the status document."""
    entry = status_document(sandbox.env)["orgs"][ORG]
    assert entry["approver"] == APPROVER
    assert entry["run_id"] == rolled_back.run_id
    assert f"Approver: **{APPROVER}**" in rolled_back.approval
    assert COMMENT in rolled_back.approval


def test_browser_rollback_saved_screenshots(rolled_back):
    """Each step left a non-empty screenshot in the test's folder."""
    names = [path.name for path in rolled_back.screenshots]
    assert names == ["01-deployment.png", "02-custom-run.png", "03-paused.png",
                     "04-resume-form.png", "05-completed.png"]
    for path in rolled_back.screenshots:
        assert path.stat().st_size > 0, path


# What the rollback changed on the sandbox


def test_browser_rollback_disables_org(rolled_back, sandbox):
    """The org carries the disabled flag in Clerk and no member session is active."""
    metadata = clerk_org(sandbox.env, ORG)["public_metadata"]
    assert metadata["ue_pilot_status"] == "disabled"
    assert active_sessions(sandbox.env, ORG) == []


def test_browser_rollback_archives_blobs(rolled_back, sandbox):
    """Only evidence records are left under <org>/; the export is archived."""
    prefix = f"{ORG}/"
    left = [name for name in blob_names(sandbox.env, prefix)
            if not is_evidence_blob(name, prefix)]
    archived = blob_names(sandbox.env, f"archived/{ORG}/exports/")
    assert left == []
    assert any(name.endswith("/manifest.json") for name in archived)
    assert any(name.endswith("/rewards.csv") for name in archived)


def test_browser_export_record_operator_trigger(rolled_back, sandbox):
    """The export subflow's evidence record names the operator's run as its trigger."""
    records = [name for name in blob_names(sandbox.env, f"archived/{ORG}/export/")
               if name.endswith("/record.json")]
    assert len(records) == 1, records
    record = json.loads(container(sandbox.env).download_blob(records[0]).readall())
    assert record["trigger"]["kind"] == "operator"
    assert record["trigger"]["parent_flow_run"]["id"] == rolled_back.run_id
    assert record["trigger"]["deployment"]["id"] == rolled_back.deployment["id"]


def test_browser_rollback_notifies_once(rolled_back, sandbox):
    """The org's contact got one notice, naming the approver typed in the form."""
    received = notifications(sandbox.env, ORG)
    assert len(received) == 1
    assert received[0]["body"]["approved_by"] == APPROVER


def test_browser_rollback_leaves_other_org(rolled_back, sandbox):
    """The other pilot org keeps its Clerk status, sessions and blobs."""
    metadata = clerk_org(sandbox.env, ORG_ACTIVE)["public_metadata"]
    assert "ue_pilot_status" not in metadata
    assert len(active_sessions(sandbox.env, ORG_ACTIVE)) == 3
    assert blob_names(sandbox.env, f"archived/{ORG_ACTIVE}/") == []


# Keeping the browser on this machine


def test_browser_blocks_other_hosts(rolled_back):
    """Every request the guard aborted was for a host other than 127.0.0.1."""
    hosts = {urlsplit(url).hostname for url in rolled_back.blocked}
    assert "127.0.0.1" not in hosts


def test_browser_loads_only_local(rolled_back):
    """Every response and WebSocket the page got came from 127.0.0.1."""
    assert rolled_back.loaded, "the page loaded nothing"
    elsewhere = [url for url in rolled_back.loaded
                 if urlsplit(url).hostname != "127.0.0.1"
                 and not url.startswith(("data:", "blob:"))]
    assert elsewhere == []
