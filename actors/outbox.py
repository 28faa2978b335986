"""The outbox relay: lifecycle events out (CONTRACT §7) from PostgreSQL to RabbitMQ.

Runs in every worker process (``OutboxMiddleware``), as a task on the worker's event loop where
Tortoise lives; pika's blocking calls run on one dedicated thread of its own. Each round:

1. connect (or reuse the connection) to RabbitMQ first, so that no row stays locked while the
   broker is unreachable;
2. in one transaction, claim the oldest pending rows (``storage.outbox.claim``: ``FOR UPDATE SKIP
   LOCKED``, so several relays share the work without publishing a row twice, and one user's rows
   keep their order), publish them to ``SESSIOND_EVENTS_OUT_EXCHANGE`` (durable topic exchange,
   persistent messages, routing key = type) with publisher confirms, mark them sent, commit.

Exactly once in the normal case. At least once across crashes: a relay that dies, or loses
PostgreSQL, after the broker confirmed a batch and before the commit leaves the batch pending,
and it is published again (same ``event_id``). While RabbitMQ is down, state changes still commit
with their events; the relay retries with backoff and drains the backlog once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import dramatiq
import pika
import pika.exceptions
from dramatiq.middleware import Middleware
from tortoise.transactions import in_transaction

from actors.runtime import Runtime
from sessiond import amqp
from sessiond.config import Settings
from storage import db
from storage import outbox as store

log = logging.getLogger(__name__)

T = TypeVar("T")

CONTENT_TYPE = "application/json"
HEARTBEAT_EVERY_S = 10.0
PURGE_EVERY_S = 600.0
MAX_BACKOFF_S = 15.0


def declare_exchange(channel: Any, settings: Settings) -> None:
    """The durable topic exchange consumers bind their queues to (routing key = event type)."""
    channel.exchange_declare(settings.events_out_exchange, exchange_type="topic", durable=True)


class Publisher:
    """A confirmed pika channel to the events-out exchange; used from one thread only."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.conn: pika.BlockingConnection | None = None
        self.channel: Any = None

    def ensure(self) -> None:
        if self.conn is not None and self.conn.is_open and self.channel.is_open:
            return
        self.close()
        params = amqp.parameter_kwargs(self.settings)
        params.update(connection_attempts=1, retry_delay=0)
        self.conn = pika.BlockingConnection(pika.ConnectionParameters(**params))
        self.channel = self.conn.channel()
        self.channel.confirm_delivery()
        declare_exchange(self.channel, self.settings)

    def publish(self, rows: Sequence[store.OutboxRow]) -> None:
        """Returns once the broker has confirmed every message; raises on a nack or a loss."""
        for row in rows:
            self.channel.basic_publish(
                exchange=self.settings.events_out_exchange,
                routing_key=row.type,
                body=row.encode(),
                properties=pika.BasicProperties(
                    delivery_mode=2,
                    content_type=CONTENT_TYPE,
                    message_id=row.event_id,
                    type=row.type,
                    timestamp=int(row.occurred_at.timestamp()),
                    app_id="sessiond",
                ),
            )

    def idle(self) -> None:
        """Services heartbeats while nothing is published."""
        if self.conn is not None and self.conn.is_open:
            self.conn.process_data_events(time_limit=0)

    def close(self) -> None:
        conn, self.conn, self.channel = self.conn, None, None
        if conn is not None and conn.is_open:
            with contextlib.suppress(Exception):
                conn.close()


class Relay:
    """The relay loop of one process; ``step`` is one claim-publish-commit round."""

    def __init__(self, settings: Settings, *, publisher: Publisher | None = None) -> None:
        self.settings = settings
        self.publisher = publisher or Publisher(settings)
        self.published = 0
        self.failures = 0
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sessiond-outbox")
        self._stopping: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def _io_call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def step(self) -> int:
        """Publishes up to one batch; returns how many rows went out."""
        await self._io_call(self.publisher.ensure)
        async with in_transaction() as tx:
            rows = await store.claim(tx, self.settings.outbox_batch_size)
            if not rows:
                return 0
            await self._io_call(self.publisher.publish, rows)
            await store.mark_sent(tx, [r.id for r in rows], at=datetime.now(UTC))
        self.published += len(rows)
        log.debug("outbox published", extra={"count": len(rows), "last_id": rows[-1].id})
        return len(rows)

    async def drain(self) -> int:
        """Rounds until nothing is pending (CLI, tests)."""
        total = 0
        while n := await self.step():
            total += n
        return total

    async def run(self) -> None:
        assert self._stopping is not None
        delay = 0.5
        idle_since = purged_at = time.monotonic()
        while not self._stopping.is_set():
            try:
                sent = await self.step()
                delay = 0.5
                if sent >= self.settings.outbox_batch_size:
                    continue  # a backlog: next batch at once
                if time.monotonic() - purged_at >= PURGE_EVERY_S:
                    purged_at = time.monotonic()
                    await self._purge()
                if sent:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= HEARTBEAT_EVERY_S:
                    idle_since = time.monotonic()
                    await self._io_call(self.publisher.idle)
                await self._sleep(self.settings.outbox_poll_s)
            except Exception as exc:  # broker or database down: retry with backoff
                self.failures += 1
                log.warning(
                    "outbox relay failed; retrying",
                    extra={"error": repr(exc)[:300], "retry_in_s": delay},
                )
                await self._io_call(self.publisher.close)
                await self._sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)

    async def _purge(self) -> None:
        if self.settings.outbox_retention_s > 0:
            before = datetime.now(UTC) - timedelta(seconds=self.settings.outbox_retention_s)
            purged = await store.purge_sent(db.conn(), before=before)
            if purged:
                log.info("outbox purged", extra={"rows": purged})

    async def _sleep(self, seconds: float) -> None:
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def start(self) -> None:
        """Starts the loop as a task on the running event loop and returns."""
        self._stopping = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self.run(), name="outbox-relay")

    async def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._io_call(self.publisher.close)
        self._io.shutdown(wait=True)


class OutboxMiddleware(Middleware):
    """Runs the relay in each worker process, between storage open and storage close."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.relay: Relay | None = None

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if not self.runtime.settings.outbox_relay:
            return
        self.relay = Relay(self.runtime.settings)
        self.runtime.run(self.relay.start())

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self.relay is not None:
            self.runtime.run(self.relay.stop())
            log.info("outbox relay stopped", extra={"published": self.relay.published})
            self.relay = None
