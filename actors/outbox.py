"""The outbox relay: lifecycle events out (CONTRACT §7) from PostgreSQL to RabbitMQ.

Runs in every worker process (``OutboxMiddleware``), as a task on the worker's event loop where
Tortoise lives, with pika's asyncio adapter on the same loop. Each round:

1. connect (or reuse the connection) to RabbitMQ first, so that no row stays locked while the
   broker is unreachable;
2. in one transaction, claim the oldest pending rows (``storage.outbox.claim``: ``FOR UPDATE SKIP
   LOCKED``, so several relays share the work without publishing a row twice, and one user's rows
   keep their order), publish them to ``SESSIOND_EVENTS_OUT_EXCHANGE`` (durable topic exchange,
   persistent messages, routing key = type) with publisher confirms awaited for the whole batch,
   mark them sent, commit.

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
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
import pika
import pika.exceptions
import pika.spec
from dramatiq.middleware import Middleware
from pika.adapters.asyncio_connection import AsyncioConnection

from actors.runtime import Runtime
from sessiond import amqp
from sessiond.config import Settings
from storage import outbox as store
from storage import relay

log = logging.getLogger(__name__)


CONTENT_TYPE = "application/json"
PURGE_EVERY_S = 600.0
MAX_BACKOFF_S = 15.0


def declare_exchange(channel: Any, settings: Settings) -> None:
    """The durable topic exchange consumers bind their queues to (routing key = event type)."""
    channel.exchange_declare(settings.events_out_exchange, exchange_type="topic", durable=True)


class Publisher:
    """Publisher confirms on pika's asyncio adapter, on the relay's own event loop.

    A batch is written at once and its confirms are awaited together (RabbitMQ acknowledges them
    with ``multiple``): one round trip per batch where a blocking channel waits once per message,
    which cost the broker most of its CPU under load."""

    def __init__(self, settings: Settings, *, timeout_s: float = 30.0) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self.conn: AsyncioConnection | None = None
        self.channel: Any = None
        self._tag = 0
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._calls: set[asyncio.Future[Any]] = set()
        self._closed: asyncio.Future[None] | None = None

    @property
    def is_open(self) -> bool:
        return bool(self.conn and self.conn.is_open and self.channel and self.channel.is_open)

    async def ensure(self) -> None:
        if self.is_open:
            return
        await self.close()
        # Each node of SESSIOND_AMQP_URL in turn, once: the relay's own loop retries later.
        failure: BaseException = ConnectionError("no AMQP URL")
        for params in amqp.parameter_list(self.settings):
            params.update(connection_attempts=1, retry_delay=0)
            try:
                await self._open(params)
                break
            except (ConnectionError, TimeoutError) as exc:
                failure = exc
                await self.close()
        else:
            raise failure
        conn = self.conn
        assert conn is not None
        self.channel = await self._call(lambda done: conn.channel(on_open_callback=done))
        self.channel.add_on_close_callback(
            lambda _ch, exc: self._lost(ConnectionError(f"channel closed: {exc!r}"))
        )
        self._tag = 0
        await self._call(
            lambda done: self.channel.confirm_delivery(self._on_confirm, callback=done)
        )
        await self._call(
            lambda done: self.channel.exchange_declare(
                self.settings.events_out_exchange,
                exchange_type="topic",
                durable=True,
                callback=done,
            )
        )

    async def _open(self, params: dict[str, Any]) -> None:
        """One connection attempt to one node; raises ``ConnectionError`` when it fails."""
        opened = self._future()

        def on_open(conn: Any) -> None:
            _settle(opened, conn)

        def on_open_error(_conn: Any, exc: BaseException) -> None:
            _settle(opened, error=ConnectionError(f"cannot reach RabbitMQ: {exc!r}"))

        closed = self._closed = asyncio.get_running_loop().create_future()

        def on_close(_conn: Any, exc: BaseException) -> None:
            _settle(closed)
            self._lost(ConnectionError(f"RabbitMQ connection closed: {exc!r}"))

        self.conn = AsyncioConnection(
            pika.ConnectionParameters(**params),
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=on_close,
            custom_ioloop=asyncio.get_running_loop(),
        )
        await self._wait(opened)

    async def publish(self, rows: Sequence[store.OutboxRow]) -> None:
        """Returns once the broker has confirmed every message; raises on a nack or a loss."""
        confirms: list[asyncio.Future[None]] = []
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
            self._tag += 1
            confirms.append(self._waiting.setdefault(self._tag, self._future()))
        results = await asyncio.wait_for(
            asyncio.gather(*confirms, return_exceptions=True), self.timeout_s
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        tags = (
            [t for t in self._waiting if t <= method.delivery_tag]
            if method.multiple
            else [method.delivery_tag]
        )
        for tag in tags:
            future = self._waiting.pop(tag, None)
            if future is not None:
                _settle(future, None, error=None if acked else NackError(f"broker nacked {tag}"))

    def _future(self) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls.add(future)
        future.add_done_callback(self._calls.discard)
        return future

    async def _wait(self, future: asyncio.Future[Any]) -> Any:
        return await asyncio.wait_for(future, self.timeout_s)

    async def _call(self, start: Callable[[Callable[[Any], None]], Any]) -> Any:
        """Runs one asynchronous AMQP method and waits for its reply (or the loss)."""
        future = self._future()
        start(lambda reply: _settle(future, reply))
        return await self._wait(future)

    def _lost(self, error: Exception) -> None:
        """Fails whatever waits on the connection: its messages were not confirmed."""
        for future in list(self._calls):
            _settle(future, error=error)
        self._waiting.clear()

    async def close(self) -> None:
        """Closes the connection cleanly (waiting briefly for the broker's close-ok)."""
        conn, self.conn, self.channel = self.conn, None, None
        closed, self._closed = self._closed, None
        if conn is not None and conn.is_open:
            with contextlib.suppress(Exception):
                conn.close()
                if closed is not None:
                    await asyncio.wait_for(asyncio.shield(closed), 2.0)
        self._lost(ConnectionError("publisher closed"))


class NackError(Exception):
    """The broker refused a message (``basic.nack``): it is not published."""


def _settle(
    future: asyncio.Future[Any], result: Any = None, *, error: Exception | None = None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Relay:
    """The relay loop of one process; ``step`` is one claim-publish-commit round."""

    def __init__(self, settings: Settings, *, publisher: Publisher | None = None) -> None:
        self.settings = settings
        self.publisher = publisher or Publisher(settings)
        self.published = 0
        self.failures = 0
        self._stopping: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def step(self) -> int:
        """Publishes up to one batch; returns how many rows went out."""
        await self.publisher.ensure()
        rows = await relay.relay_batch(self.settings.outbox_batch_size, self.publisher.publish)
        if not rows:
            return 0
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
        purged_at = time.monotonic()
        while not self._stopping.is_set():
            try:
                sent = await self.step()
                delay = 0.5
                if sent >= self.settings.outbox_batch_size:
                    continue  # a backlog: next batch at once
                if time.monotonic() - purged_at >= PURGE_EVERY_S:
                    purged_at = time.monotonic()
                    await self._purge()
                await self._sleep(self.settings.outbox_poll_s)
            except Exception as exc:  # broker or database down: retry with backoff
                self.failures += 1
                log.warning(
                    "outbox relay failed; retrying",
                    extra={"error": repr(exc)[:300], "retry_in_s": delay},
                )
                await self.publisher.close()
                await self._sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)

    async def _purge(self) -> None:
        if self.settings.outbox_retention_s > 0:
            before = datetime.now(UTC) - timedelta(seconds=self.settings.outbox_retention_s)
            purged = await relay.purge_sent(before=before)
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
        await self.publisher.close()


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
