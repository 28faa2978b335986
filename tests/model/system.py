"""The system under test: the real API, workers and scheduler on a private corner of the stack.

The run gets its own vhost, database and Redis db (``sessiond.stack.namespace_env``), emptied at
the start, so it never touches the test suite's data. The processes are started exactly as an
operator starts them (``sessiond api``, ``sessiond worker --processes 2``, ``sessiond scheduler``)
with short timings, so that idle expiry and the reconciler happen within a short run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from loadtests.harness import free_port
from sessiond import stack
from sessiond.config import Settings
from storage import db, redis_conn
from tests.model.checker import PgUser
from tests.model.client import Http, Recorder
from tests.model.nemesis import Nemesis, Service

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "sessiond_model"
USER = stack.USER
STATS_INTERVAL_S = 5.0
# Queues that hold events on their way (ingest, Keycloak, partitions and their retry queues) or
# events that failed (``.XQ``, the dead-letter queue).
EVENT_QUEUES = ("sessiond.ingest", "sessiond.keycloak", "sessiond.events.p", "sessiond.dead-letter")
REDIS_DB = 13
JWT_SECRET = "model-checker-secret-long-enough-for-hs256"  # local stack only
IDLE_TIMEOUT_S = 10
EXPIRY_PERIOD_S = 2
PROCESS_ENV: dict[str, str] = {
    "SESSIOND_ENV": "test",
    "SESSIOND_JWT_SECRET": JWT_SECRET,
    "SESSIOND_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
    "SESSIOND_IDLE_SCOPE": "session",  # the checker's final state measures each session
    "SESSIOND_EXPIRY_PERIOD_S": str(EXPIRY_PERIOD_S),
    "SESSIOND_ACTIVITY_FLUSH_S": "1",
    # As the fault tests: a retry budget longer than any outage the nemesis causes, so an event
    # waits for PostgreSQL instead of being dead-lettered (docs/reliability.md "Faults").
    "SESSIOND_RETRY_MAX": "60",
    "SESSIOND_RETRY_MIN_BACKOFF_MS": "200",
    "SESSIOND_RETRY_MAX_BACKOFF_MS": "2000",
    # INFO (``SESSIOND_MODEL_LOG_LEVEL=INFO``) to follow a late event through the workers' logs.
    "SESSIOND_LOG_LEVEL": os.environ.get("SESSIOND_MODEL_LOG_LEVEL", "WARNING"),
}


@dataclass
class System:
    cfg: stack.StackConfig
    logs: Path
    env: dict[str, str] = field(default_factory=dict)
    settings: Settings | None = None
    port: int = 0
    api: Service | None = None
    worker: Service | None = None
    scheduler: Service | None = None

    def management(self, method: str, path: str, body: Any = None) -> Any:
        """RabbitMQ's management API (this stack's port): instant, where ``rabbitmqctl`` takes
        seconds to boot its Erlang VM."""
        data = None if body is None else json.dumps(body).encode()
        auth = base64.b64encode(f"{USER}:{stack.PASSWORD}".encode()).decode()
        failed: OSError | None = None
        for port in self.mgmt_ports():
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/{path}",
                data=data,
                method=method,
                headers={
                    "Authorization": f"Basic {auth}",
                    "Content-Type": "application/json",
                },
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as reply:  # noqa: S310 - 127.0.0.1
                    raw = reply.read()
            except urllib.error.HTTPError:
                raise  # the broker answered: no other node would answer otherwise
            except OSError as exc:  # this node is down: the next one
                failed = exc
                continue
            return json.loads(raw) if raw else None
        assert failed is not None
        raise failed

    def mgmt_ports(self) -> list[int]:
        """Where the management API may answer (the cluster: any live node)."""
        return [self.cfg.mgmt_port]

    def nemesis(self, recorder: Recorder, *, seed: int, kinds: tuple[str, ...]) -> Nemesis:
        assert self.worker is not None
        return Nemesis(self.cfg, self.worker, recorder, seed=seed, kinds=kinds)

    def prepare(self) -> Settings:
        """Stack up, a fresh vhost/database/Redis db, the schema from the migrations."""
        stack.up(self.cfg, install=False)
        with contextlib.suppress(urllib.error.HTTPError):  # 404: no such vhost yet
            self.management("DELETE", f"vhosts/{NAMESPACE}")
        self.management("PUT", f"vhosts/{NAMESPACE}", {})
        everything = {"configure": ".*", "write": ".*", "read": ".*"}
        self.management("PUT", f"permissions/{NAMESPACE}/{USER}", everything)
        env = self.cfg.env_dict()
        urls = {
            **env,
            "SESSIOND_AMQP_URL": env["SESSIOND_AMQP_URL"].rsplit("/", 1)[0] + f"/{NAMESPACE}",
            "SESSIOND_REDIS_URL": env["SESSIOND_REDIS_URL"].rsplit("/", 1)[0] + f"/{REDIS_DB}",
            "SESSIOND_DATABASE_URL": env["SESSIOND_DATABASE_URL"].rsplit("/", 1)[0]
            + f"/{NAMESPACE}",
        }
        asyncio.run(self._create_db(env["SESSIOND_DATABASE_URL"]))
        settings = Settings(
            amqp_url=urls["SESSIOND_AMQP_URL"],
            amqp_ca_file=urls["SESSIOND_AMQP_CA_FILE"],
            redis_url=urls["SESSIOND_REDIS_URL"],
            database_url=urls["SESSIOND_DATABASE_URL"],
            jwt_secret=JWT_SECRET,
        )
        return self.install(urls, settings)

    def install(self, urls: dict[str, str], settings: Settings) -> Settings:
        """The processes' environment and an empty, migrated database and Redis."""
        self.port = free_port()
        self.env = {
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith("SESSIOND_") or k.startswith("SESSIOND_STACK")
            },
            **urls,
            **PROCESS_ENV,
            "SESSIOND_API_PORT": str(self.port),
        }
        self.settings = settings
        asyncio.run(self._reset_db())
        self.flush_redis(settings)
        asyncio.run(db.migrate(settings))
        return settings

    def flush_redis(self, settings: Settings) -> None:
        redis_conn.connect_sync(settings).flushdb()

    async def _create_db(self, url: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", NAMESPACE):
                await conn.execute(f'CREATE DATABASE "{NAMESPACE}"')
        finally:
            await conn.close()

    async def _reset_db(self) -> None:
        assert self.settings is not None
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
        finally:
            await conn.close()

    def _argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "sessiond.cli", *args]

    def start(self, *, api_workers: int) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        api = self._argv("api", "--workers", str(api_workers))
        worker = self._argv("worker", "--processes", "2", "--threads", "4")
        self.api = Service("api", api, self.env, self.logs)
        self.worker = Service("worker", worker, self.env, self.logs)
        self.scheduler = Service("scheduler", self._argv("scheduler"), self.env, self.logs)
        try:
            for service in (self.api, self.worker, self.scheduler):
                service.start()
            asyncio.run(self._ready())
        except BaseException:
            # Else the workers of a run whose API never came up outlive it, consuming from the
            # next run's queues (seen in CI after an API start failure).
            self.stop()
            raise

    async def _ready(self, timeout: float = 90.0) -> None:
        http = Http("127.0.0.1", self.port)
        deadline = time.monotonic() + timeout
        while (await http.call("GET", "/health/ready")).status != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API is not ready after {timeout:.0f} s; see {self.logs}")
            await asyncio.sleep(0.5)

    def stop(self) -> None:
        for service in (self.scheduler, self.worker, self.api):
            if service is not None:
                service.stop()

    # ------------------------------------------------------------------ quiescence, final state

    def backlog(self) -> tuple[int, int]:
        """(messages still to process, dead letters) in the run's vhost, unacknowledged ones
        included (the management API's ``messages`` is ready + unacked)."""
        try:
            queues = self.management("GET", f"queues/{NAMESPACE}?columns=name,messages")
        except (OSError, ValueError):
            return -1, 0  # the broker is not answering yet
        pending = dead = 0
        for q in queues:
            name, count = str(q.get("name")), int(q.get("messages") or 0)
            if not name.startswith(EVENT_QUEUES) or name.endswith(".stamp"):
                continue  # periodic jobs (a failed tick is skipped), the ingress' stamp queue
            if name.endswith(".XQ") or name == "sessiond.dead-letter":
                dead += count
            else:
                pending += count
        return pending, dead

    def quiesce(self, timeout: float = 120.0) -> tuple[bool, int]:
        """Waits until nothing is left to apply; returns (quiet, dead letters). The management
        API's counts are refreshed every 5 s (RabbitMQ's ``collect_statistics_interval``), so
        "nothing left" must hold across more than one refresh."""
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        dead = 0
        while quiet_since is None or time.monotonic() - quiet_since < STATS_INTERVAL_S + 0.5:
            if time.monotonic() > deadline:
                return False, dead
            pending, dead = self.backlog()
            if pending != 0:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            time.sleep(0.5)
        return True, dead

    async def final_state(self, prefix: str) -> dict[str, PgUser]:
        assert self.settings is not None
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            users = await conn.fetch("SELECT id, status FROM users WHERE id LIKE $1", f"{prefix}-%")
            rows = await conn.fetch(
                "SELECT user_id, session_id, status, end_reason FROM sessions"
                " WHERE user_id LIKE $1",
                f"{prefix}-%",
            )
        finally:
            await conn.close()
        final = {str(u["id"]): PgUser(status=str(u["status"])) for u in users}
        for r in rows:
            pg = final.setdefault(str(r["user_id"]), PgUser(status="missing"))
            if r["status"] == "connected":
                pg.open.add(str(r["session_id"]))
            elif r["end_reason"] == "idle_timeout":
                pg.ended_idle.add(str(r["session_id"]))
        return final
