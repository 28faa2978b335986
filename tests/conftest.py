"""One fixture per real backend (STYLE.md): the local stack's RabbitMQ, Redis and PostgreSQL.

Tests run against the test vhost ``sessiond_test``, database ``sessiond_test`` and Redis db 15 of
the stack started by ``sessiond stack up``. A missing server fails the suite; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pika
import pytest
from dramatiq.asyncio import EventLoopThread

from sessiond import amqp, stack
from sessiond.config import Settings, get_settings
from sessiond.stack import cluster
from sessiond.stack.cluster_config import ClusterConfig
from storage import cache as cache_mod
from storage import db as db_mod
from storage import redis_conn
from storage.redis_conn import AsyncClient
from tests import stacks

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("audit_events", "event_receipts", "outbox", "processed_events", "sessions", "users")


def wait_until(
    predicate: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.1
) -> Any:
    """Polls until ``predicate()`` is truthy; returns its value or fails with the last one."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        time.sleep(interval)
        value = predicate()
    return value


async def async_wait_until(
    predicate: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.1
) -> Any:
    deadline = time.monotonic() + timeout
    value = await predicate()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        await asyncio.sleep(interval)
        value = await predicate()
    return value


async def cache_entry_when(
    redis: AsyncClient, user_id: str, predicate: Callable[[dict[str, Any] | None], bool]
) -> dict[str, Any] | None:
    """The worker syncs Redis just after its PostgreSQL commit, so a test that has seen the
    commit waits for the cache to follow instead of racing it; returns the entry once
    ``predicate`` holds."""

    async def settled() -> list[dict[str, Any] | None] | None:
        raw = await redis.get(f"user:{user_id}")
        value = json.loads(raw) if raw else None
        return [value] if predicate(value) else None

    found: list[dict[str, Any] | None] = await async_wait_until(settled)
    return found[0]


@pytest.fixture(scope="session")
def stack_config() -> stack.StackConfig:
    cfg = stack.StackConfig.from_env()
    stack.up(cfg, install=False)
    return cfg


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[ClusterConfig]:
    """The local cluster (CONTRACT §10) started for the tests that ask for it, and stopped at the
    end of the session unless it was already running (someone's ``stack up --cluster``)."""
    cfg = ClusterConfig.from_env()
    was_up = all(s["running"] for s in cluster.status(cfg).values())
    cluster.up(cfg)
    try:
        yield cfg
    finally:
        if not was_up:
            cluster.down(cfg)


def isolated(cfg: stack.StackConfig) -> dict[str, str]:
    """The stack's test endpoints, or private ones when ``SESSIOND_TEST_ISOLATION=<name>`` is set
    (own database, vhost and Redis db), so that two suites can share one stack."""
    name = os.environ.get("SESSIOND_TEST_ISOLATION", "")
    if not name:
        return cfg.env_dict(test=True)
    redis_db = int(os.environ.get("SESSIOND_TEST_REDIS_DB", "14"))
    return stack.namespace_env(cfg, f"sessiond_test_{name}", redis_db)


@pytest.fixture(scope="session")
def test_env(stack_config: stack.StackConfig) -> dict[str, str]:
    """The environment every test process (and every spawned worker/API) runs with."""
    env = {
        **isolated(stack_config),
        "SESSIOND_ENV": "test",
        "SESSIOND_JWT_SECRET": "test-secret-that-is-long-enough-for-hs256",
        "SESSIOND_RETRY_MIN_BACKOFF_MS": "200",
        "SESSIOND_RETRY_MAX_BACKOFF_MS": "2000",
        "SESSIOND_LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)
    get_settings.cache_clear()
    return env


@pytest.fixture(scope="session")
def settings(test_env: dict[str, str]) -> Settings:
    return get_settings()


def rebuild_schema(settings: Settings) -> None:
    """Drops the test database's schema and builds it again from the migrations, exactly as
    production gets its schema (the single-node stack's and the cluster's alike)."""

    async def rebuild() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
        finally:
            await conn.close()
        await db_mod.migrate(settings)

    asyncio.run(rebuild())


@pytest.fixture(scope="session")
def migrated(settings: Settings) -> Settings:
    """A test database rebuilt from the migrations, once per session."""
    rebuild_schema(settings)
    return settings


async def truncate(settings: Settings) -> None:
    """A worker of the previous test may still be finishing a transaction on these tables in
    another lock order: PostgreSQL then picks the TRUNCATE as the deadlock victim, and it tries
    again rather than failing the next test's set-up."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        for attempt in range(5):
            try:
                await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
                return
            except asyncpg.exceptions.DeadlockDetectedError:
                if attempt == 4:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await conn.close()


@pytest.fixture
def pg(raw_pg: asyncpg.Connection) -> asyncpg.Connection:
    """The connection tests look at the database with (``orm_pg`` where Tortoise is needed)."""
    return raw_pg


@pytest.fixture
async def raw_pg(migrated: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A raw connection to the emptied test database, for checking what the processes wrote;
    Tortoise stays closed (for tests whose API or workers open it themselves)."""
    await truncate(migrated)
    conn = await asyncpg.connect(migrated.database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def db(migrated: Settings) -> AsyncIterator[Settings]:
    """Tortoise open on the empty test database."""
    await truncate(migrated)
    await db_mod.open_db(migrated)
    try:
        yield migrated
    finally:
        await db_mod.close_db()


@pytest.fixture
async def orm_pg(db: Settings) -> AsyncIterator[asyncpg.Connection]:
    """Tortoise open on the emptied test database (``db``), plus a raw connection to look at it."""
    conn = await asyncpg.connect(db.database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def storage_loop(raw_pg: asyncpg.Connection, migrated: Settings) -> Iterator[EventLoopThread]:
    """The worker's arrangement in this process: Tortoise open on an event-loop thread of its own
    (Dramatiq's), which an in-process ingress reaches from its thread (``actors.stamping``)."""
    thread = EventLoopThread(logging.getLogger("tests.storage_loop"))
    thread.start(timeout=10)
    thread.run_coroutine(db_mod.open_db(migrated))
    try:
        yield thread
    finally:
        thread.run_coroutine(db_mod.close_db())
        thread.stop()  # type: ignore[no-untyped-call]


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[AsyncClient]:
    """A decoding client on the emptied test Redis db, for checking what the processes wrote."""
    client = redis_conn.connect(settings, decode_responses=True)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def events_out(settings: Settings) -> Iterator[Any]:
    """A consumer of sessiond's lifecycle events, on a queue of its own."""
    from tests.outbox.support import EventsOut

    consumer = EventsOut(settings, queue=f"test.out.{uuid.uuid4().hex[:8]}")
    try:
        yield consumer
    finally:
        consumer.close()


@pytest.fixture
async def cache(settings: Settings) -> AsyncIterator[cache_mod.Cache]:
    c = cache_mod.Cache(redis_conn.connect(settings), ttl_s=settings.cache_ttl_s)
    await c.client.flushdb()
    try:
        yield c
    finally:
        await c.close()


class Amqp:
    """A plain AMQP client, the way the auth service publishes (it knows nothing of Dramatiq)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.conn = pika.BlockingConnection(amqp.connection_parameters(settings))
        self.ch = self.conn.channel()
        amqp.declare_topology(self.ch, settings)
        self.ch.confirm_delivery()

    def publish(self, body: bytes | str | dict[str, Any], routing_key: str = "auth.test") -> None:
        import json

        data = json.dumps(body).encode() if isinstance(body, dict) else body
        data = data.encode() if isinstance(data, str) else data
        self.ch.basic_publish(
            self.settings.events_exchange,
            routing_key,
            data,
            pika.BasicProperties(delivery_mode=2),
            mandatory=True,
        )

    def publish_many(self, bodies: list[dict[str, Any]], *, batch: int = 500) -> None:
        """Bulk publishing in AMQP transactions: one round trip per batch instead of per message,
        still with the broker's guarantee that each committed batch is stored."""
        import json

        ch = self.conn.channel()
        ch.tx_select()
        for i, body in enumerate(bodies, 1):
            ch.basic_publish(
                self.settings.events_exchange,
                "auth.bulk",
                json.dumps(body).encode(),
                pika.BasicProperties(delivery_mode=2),
            )
            if i % batch == 0:
                ch.tx_commit()
        ch.tx_commit()
        ch.close()

    def depth(self, queue: str) -> int:
        return int(self.ch.queue_declare(queue, passive=True).method.message_count)

    def purge(self, *queues: str) -> None:
        for q in queues:
            try:
                self.ch.queue_purge(q)
            except pika.exceptions.ChannelClosedByBroker:
                self.ch = self.conn.channel()
                self.ch.confirm_delivery()

    def close(self) -> None:
        if self.conn.is_open:
            self.conn.close()


def all_queues(settings: Settings) -> list[str]:
    from actors.topology import JOBS_QUEUE, partition_queues, stamp_queue

    names = [settings.ingest_queue, settings.dead_letter_queue, stamp_queue(settings.ingest_queue)]
    for q in [*partition_queues(settings.partitions), JOBS_QUEUE]:
        names += [q, f"{q}.DQ", f"{q}.XQ"]
    return names


@pytest.fixture
def broker_client(settings: Settings) -> Iterator[Amqp]:
    client = Amqp(settings)
    client.purge(*all_queues(settings))
    try:
        yield client
    finally:
        client.close()


class Process:
    """A sessiond process (worker, API, scheduler) started like an operator would start it."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log, self.argv = log, argv
        self.handle = log.open("wb")
        self.proc = subprocess.Popen(
            argv, env={**os.environ, **env}, cwd=ROOT, stdout=self.handle,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.alive():
            # Only the main process, as Kubernetes and a terminal's Ctrl-C-less stop do; it
            # forwards the signal to its children itself.
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.handle.close()
        return int(self.proc.returncode)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keeps each phase's report on the test item, so a fixture can tell that its test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


LOG_TAIL_LINES = 60


@pytest.fixture
def spawn(
    test_env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Process]]:
    """Starts ``sessiond <args>`` processes; all are stopped (SIGTERM) at the end of the test.
    When the test failed, the tail of each process's log is written to the test's output: a CI
    run on a machine that is gone leaves nothing else to read."""
    started: list[Process] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Process:
        argv = [sys.executable, "-m", "sessiond.cli", *args]
        proc = Process(argv, {**test_env, **(env or {})}, tmp_path / f"proc{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    report = getattr(request.node, "report_call", None)
    failed = report is not None and report.failed
    dumps = [stacks.report(p.proc.pid, p.log) for p in started if p.alive()] if failed else []
    for proc in started:
        proc.stop()
    if failed:
        sys.stderr.write("\n".join(dumps) + "\n")
        for proc in started:
            tail = proc.output().splitlines()[-LOG_TAIL_LINES:]
            sys.stderr.write(f"--- {' '.join(proc.argv[3:])} ({proc.log.name}) ---\n")
            sys.stderr.write("\n".join(tail) + "\n")
