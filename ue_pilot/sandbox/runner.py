"""Start the whole sandbox pilot on 127.0.0.1 and hand out the `UE_*` settings
that point the audit at it.

`Sandbox` runs everything in this process. `SandboxProcess` runs it in a child
process (`python -m ue_pilot.sandbox.runner`), which is how the CLI and the
tests use it: the stand-ins then get their own CPU time and stop cleanly.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import redis

from ue_pilot.clients import probe_agents_key, synthetic_routes_key
from ue_pilot.sandbox.app import SessionRegistry, create_ue_app
from ue_pilot.sandbox.azurite import Azurite
from ue_pilot.sandbox.clerk import (
    CLERK_FAULTS,
    ClerkAPIError,
    ClerkState,
    create_clerk_app,
)
from ue_pilot.sandbox.database import SandboxDatabase, drop_leftovers
from ue_pilot.sandbox.faults import validate_faults
from ue_pilot.sandbox.logs_api import create_logs_app
from ue_pilot.sandbox.onboarding import start_onboarding_services
from ue_pilot.sandbox.pagerduty import create_pagerduty_app
from ue_pilot.sandbox.servers import (
    RequestDelay,
    RunningServer,
    find_free_port,
    start_server,
)
from ue_pilot.sandbox.telemetry import TelemetryStore
from ue_pilot.sandbox.traffic import TrafficGenerator, seed_history
from ue_pilot.sandbox.webhook import create_webhook_app

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
ROLES = ("member", "admin", "owner")
# Clerk roles of the seeded member and admin; the owner creates the org.
CLERK_ROLES = ("org:member", "org:admin")
CLERK_STATUS_KEY = "ue_pilot_status"
HISTORY_MINUTES = 120
RESOURCE_ID = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/ue-sandbox"
    "/providers/microsoft.insights/components/ue-pilot-sandbox"
)
WORKSPACE_ID = "11111111-1111-1111-1111-111111111111"
# Statements the sandbox application sets the tenant context with. The
# rls-session-set fault sets it for the whole session, as a flawed deployment does.
CONTEXT_SQL_LOCAL = "SELECT set_config(%(setting)s, %(org)s, true)"
CONTEXT_SQL_SESSION = "SELECT set_config(%(setting)s, %(org)s, false)"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def seed_clerk(clerk: ClerkState, org_ids: list[str]) -> None:
    """Give each org an owner, an admin and a member, each signed in to it."""
    for org_id in org_ids:
        users = [
            clerk.create_user({
                "email_address": [f"{role}@{org_id.replace('_', '-')}.example"],
                "first_name": role.capitalize(),
            })["id"]
            for role in ROLES
        ]
        name = f"Sandbox pilot {org_id.removeprefix('org_')}"
        clerk.seed_organization(
            org_id, name, org_id.replace("_", "-"), created_by=users[-1]
        )
        for user_id, role in zip(users[:-1], CLERK_ROLES, strict=True):
            clerk.create_membership(org_id, user_id, role)
        for user_id in users:
            clerk.create_session(user_id, org_id)


def clerk_org_active(clerk: ClerkState, org_id: str) -> bool:
    """Return False when the org's pilot status in Clerk is `disabled`.

    This is the flag UE honours (the setting UE_CLERK_STATUS_KEY, default
    `ue_pilot_status`): a disabled org's sessions stop resolving.
    """
    try:
        organization = clerk.get_organization(org_id)
    except ClerkAPIError:
        return True
    status = organization.get("public_metadata", {}).get(CLERK_STATUS_KEY)
    return status != "disabled"


def sandbox_org_ids(count: int) -> list[str]:
    return [f"org_sandbox{index:04d}" for index in range(1, count + 1)]


@dataclass
class Sandbox:
    """The database, the UE application and the Logs and PagerDuty stand-ins."""

    org_count: int = 3
    faults: list[str] = field(default_factory=list)
    admin_url: str = DEFAULT_ADMIN_URL
    redis_url: str = DEFAULT_REDIS_URL
    request_delay_ms: float = 0.0
    tenant_setting: str = "app.org_id"
    storage: bool = False
    bulk_rewards: int = 0
    servers: list[RunningServer] = field(default_factory=list)

    def start(self) -> dict[str, str]:
        """Start every part and return the settings that point at them."""
        faults = set(validate_faults(self.faults))
        org_ids = sandbox_org_ids(self.org_count)
        drop_leftovers(self.admin_url)
        self.database = SandboxDatabase.create(
            self.admin_url, org_ids=org_ids, faults=faults,
            tenant_setting=self.tenant_setting,
        )
        try:
            if self.bulk_rewards:
                self.database.add_bulk_rewards(org_ids[0], self.bulk_rewards)
            return self._start_services(org_ids, faults)
        except BaseException:
            self.stop()
            raise

    def _start_services(self, org_ids: list[str], faults: set[str]) -> dict[str, str]:
        self.telemetry = TelemetryStore()
        self.telemetry.enabled = "no-telemetry" not in faults
        seed_history(self.telemetry, org_ids, faults,
                     now=datetime.now(UTC), minutes=HISTORY_MINUTES)
        clerk_env = self._start_clerk(org_ids, faults)
        self.traffic = TrafficGenerator(
            self.telemetry, org_ids, faults, org_active=self.org_active
        )
        self.traffic.start()

        sessions = SessionRegistry(org_active=self.org_active)
        probe_sessions = {
            org: {role: sessions.issue(org, role) for role in ROLES} for org in org_ids
        }
        logs_token = secrets.token_urlsafe(24)
        routing_key = secrets.token_hex(16)

        app = start_server(create_ue_app(
            app_url=self.database.app_url, tenant_setting=self.tenant_setting,
            sessions=sessions, telemetry=self.telemetry, faults=faults,
            org_ids=org_ids, request_delay_ms=self.request_delay_ms,
        ))
        self.servers.append(app)
        self.app_url = app.url
        logs_app = create_logs_app(
            self.telemetry, token=logs_token, workspace_id=WORKSPACE_ID,
            resource_id=RESOURCE_ID, partial="logs-partial" in faults,
        )
        logs = start_server(RequestDelay(logs_app, self.request_delay_ms))
        self.servers.append(logs)
        pagerduty = start_server(create_pagerduty_app(routing_key))
        self.servers.append(pagerduty)
        webhook_token = secrets.token_urlsafe(24)
        webhook = start_server(create_webhook_app(webhook_token))
        self.servers.append(webhook)

        context_sql = (CONTEXT_SQL_SESSION if "rls-session-set" in faults
                       else CONTEXT_SQL_LOCAL)
        env = self._start_storage(faults) if self.storage else {}
        env |= start_onboarding_services(self, sessions, faults)
        return env | clerk_env | {
            "UE_BASE_URL": app.url,
            "UE_PILOT_ORG_IDS": ",".join(org_ids),
            "UE_PROBE_SESSIONS": json.dumps(probe_sessions),
            "UE_LOGS_ENDPOINT": logs.url,
            "UE_LOGS_AUTH": "static",
            "UE_LOGS_STATIC_TOKEN": logs_token,
            "UE_LOGS_RESOURCE_ID": RESOURCE_ID,
            "UE_LOGS_WORKSPACE_ID": WORKSPACE_ID,
            "UE_LOGS_SCHEMA": "classic",
            "UE_DATABASE_URL": self.database.audit_url,
            "UE_DB_APP_ROLE": self.database.app_role,
            "UE_TENANT_SETTING": self.tenant_setting,
            "UE_RLS_CONTEXT_SQL": context_sql,
            "UE_REDIS_URL": self.redis_url,
            "UE_STATE_PREFIX": f"ue-pilot-{self.database.name}",
            "UE_PAGERDUTY_ROUTING_KEY": routing_key,
            "UE_PAGERDUTY_EVENTS_URL": pagerduty.url + "/v2/enqueue",
            "UE_NOTIFY_WEBHOOK_URL": f"{webhook.url}/hooks/{webhook_token}",
            "UE_SANDBOX_NOTIFY_URL": webhook.url,
        }

    def _start_clerk(self, org_ids: list[str], faults: set[str]) -> dict[str, str]:
        """Start the Clerk stand-in with each org, its members and their sessions."""
        secret_key = "sk_test_" + secrets.token_hex(16)
        clerk_app = create_clerk_app(
            secret_key, faults=faults & set(CLERK_FAULTS)
        )
        self.clerk = clerk_app.state.clerk
        seed_clerk(self.clerk, org_ids)
        server = start_server(clerk_app)
        self.servers.append(server)
        return {
            "UE_CLERK_API_URL": server.url + "/v1",
            "UE_CLERK_SECRET_KEY": secret_key,
            "UE_SANDBOX_CLERK_URL": server.url,
        }

    def org_active(self, org_id: str) -> bool:
        """Return False once the org's Clerk metadata marks it disabled."""
        return clerk_org_active(self.clerk, org_id)

    def _start_storage(self, faults: set[str]) -> dict[str, str]:
        """Start Azurite's blob service and return the storage settings."""
        self.azurite = Azurite.start()
        connection_string = self.azurite.connection_string
        if "storage-unavailable" in faults:
            # A storage account that cannot be reached: nothing listens there.
            connection_string = connection_string.replace(
                f":{self.azurite.port}/", f":{find_free_port()}/"
            )
        if "blob-copy-fails" in faults:
            from ue_pilot.sandbox.storage_proxy import start_storage_proxy

            # A proxy in front of Azurite fails every Copy Blob request.
            proxy = start_storage_proxy(self.azurite.port)
            self.servers.append(proxy)
            proxy_port = proxy.url.rsplit(":", 1)[1]
            connection_string = connection_string.replace(
                f":{self.azurite.port}/", f":{proxy_port}/"
            )
        return {
            "UE_BLOB_CONNECTION_STRING": connection_string,
            "UE_BLOB_CONTAINER": "evidence",
            "UE_SANDBOX_BLOB_CONNECTION_STRING": self.azurite.connection_string,
        }

    def stop(self) -> None:
        """Stop the servers and the traffic, and drop the database and roles."""
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()
        azurite = getattr(self, "azurite", None)
        if azurite is not None:
            azurite.stop()
        traffic = getattr(self, "traffic", None)
        if traffic is not None:
            traffic.stop()
        database = getattr(self, "database", None)
        if database is not None:
            self._forget_state(f"ue-pilot-{database.name}")
            if getattr(self, "app_url", ""):
                self._forget_state(probe_agents_key(self.app_url))
                self._forget_state(synthetic_routes_key(self.app_url))
            database.drop()

    def _forget_state(self, prefix: str) -> None:
        """Delete the Redis keys audits of this sandbox left under its prefix."""
        try:
            client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
            keys = list(client.scan_iter(match=f"{prefix}*", count=500))
            if keys:
                client.delete(*keys)
        except redis.RedisError:
            pass


def stop_with_parent() -> None:
    """Ask Linux to send SIGTERM to this child when the thread that forked it dies.

    A parent killed with SIGKILL then still gets its sandbox stopped and its
    database dropped. Elsewhere this does nothing.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class SandboxStartError(RuntimeError):
    """The sandbox child process exited or did not become ready in time."""

    def summary(self) -> str:
        """Return the first line and the last line of the child's output."""
        lines = [line for line in str(self).splitlines() if line.strip()]
        if len(lines) <= 2:
            return " ".join(lines)
        return f"{lines[0]} {lines[-1]}"


class SandboxProcess:
    """The sandbox in a child process; `env` contains its `UE_*` settings."""

    def __init__(self, orgs: int = 3, faults: list[str] | tuple[str, ...] = (),
                 request_delay_ms: float = 0.0, timeout: float = 120.0,
                 storage: bool = False, bulk_rewards: int = 0) -> None:
        validate_faults(list(faults))
        self._dir = tempfile.TemporaryDirectory(prefix="ue-sandbox-")
        env_file = Path(self._dir.name) / "env.json"
        log_file = open(Path(self._dir.name) / "sandbox.log", "w+b")
        command = [sys.executable, "-m", "ue_pilot.sandbox.runner", "--orgs", str(orgs),
                   "--env-file", str(env_file), "--request-delay-ms",
                   str(request_delay_ms)]
        for name in faults:
            command += ["--fault", name]
        if storage:
            command.append("--storage")
        if bulk_rewards:
            command += ["--bulk-rewards", str(bulk_rewards)]
        self.process = subprocess.Popen(
            command, stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL,
            preexec_fn=stop_with_parent,
        )
        self._log = log_file
        self.env = self._wait_for(env_file, timeout)

    def _wait_for(self, env_file: Path, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while not env_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.log_tail()
                self.stop()
                raise SandboxStartError(f"the sandbox did not start:\n{log}")
            time.sleep(0.1)
        return json.loads(env_file.read_text())

    def log_tail(self, limit: int = 4000) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-limit:]

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the child with SIGTERM (it drops its database), SIGKILL if stuck."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self._dir.cleanup()

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(args: argparse.Namespace) -> int:
    """Run the sandbox until SIGINT or SIGTERM."""
    sandbox = Sandbox(org_count=args.orgs, faults=args.fault or [],
                      admin_url=args.admin_url, redis_url=args.redis_url,
                      request_delay_ms=args.request_delay_ms,
                      storage=args.storage, bulk_rewards=args.bulk_rewards)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    env = sandbox.start()
    try:
        if args.env_file:
            partial = Path(args.env_file).with_suffix(".tmp")
            partial.write_text(json.dumps(env))
            os.replace(partial, args.env_file)
        else:
            for name, value in env.items():
                print(f"export {name}='{value}'", flush=True)
            print("# sandbox running; stop it with Ctrl-C", flush=True)
        stopping.wait()
    finally:
        sandbox.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ue_pilot.sandbox.runner")
    parser.add_argument("--orgs", type=int, default=3)
    parser.add_argument("--fault", action="append")
    parser.add_argument("--env-file")
    parser.add_argument("--admin-url", default=os.environ.get(
        "UE_SANDBOX_ADMIN_URL", DEFAULT_ADMIN_URL))
    parser.add_argument("--redis-url", default=os.environ.get(
        "UE_SANDBOX_REDIS_URL", DEFAULT_REDIS_URL))
    parser.add_argument("--request-delay-ms", type=float, default=0.0)
    parser.add_argument("--storage", action="store_true",
                        help="also start Azurite's blob service")
    parser.add_argument("--bulk-rewards", type=int, default=0,
                        help="extra reward rows for the first org (about 100 "
                        "bytes of CSV each)")
    return parser


if __name__ == "__main__":
    sys.exit(serve(build_parser().parse_args()))
