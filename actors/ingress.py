"""The ingress: plain JSON events from the auth service in, partitioned Dramatiq messages out.

The publisher knows nothing of Dramatiq (CONTRACT §1), so a small consumer in every worker process
reads the durable queue bound to the events exchange, validates each body, and republishes it as a
Dramatiq message to the partition queue of its user, or to the dead-letter queue with a reason.
The channel is in AMQP transaction mode: a batch's publishes and the acknowledgement of its inputs
commit together, so a crash in between redelivers the batch (duplicates are harmless) and loses
nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dramatiq
import pika
import pika.exceptions
from dramatiq.middleware import Middleware

from actors import deadletter
from actors.topology import JOBS_QUEUE, actor_name, declare_dramatiq_queue, partition_queues
from sessiond import amqp
from sessiond.config import Settings
from sessiond.errors import InvalidEvent
from sessiond.events import Event, decode_event, partition_of, partition_queue

log = logging.getLogger(__name__)

Decoder = Callable[[bytes, datetime], Event | None]
"""Turns a body into an event; ``None`` means "valid but nothing to do" (e.g. a Keycloak event
type sessiond ignores); ``InvalidEvent`` means dead-letter it."""


@dataclass(frozen=True, slots=True)
class Source:
    queue: str
    decode: Decoder


def auth_source(settings: Settings) -> Source:
    def decode(body: bytes, received_at: datetime) -> Event:
        return decode_event(body, received_at=received_at, max_bytes=settings.max_event_bytes)

    return Source(settings.ingest_queue, decode)


@dataclass(slots=True)
class _Delivery:
    source: Source
    method: Any
    props: pika.BasicProperties
    body: bytes


def event_message(event: Event, raw: bytes, partitions: int) -> dramatiq.Message[Any]:
    """The Dramatiq envelope for one event: the validated event plus the original body."""
    index = partition_of(event.user_id, partitions)
    return dramatiq.Message(
        queue_name=partition_queue(index),
        actor_name=actor_name(index),
        args=(event.to_wire(), raw.decode("utf-8")),
        kwargs={},
        options={},
    )


def journal_message(reason: str, detail: str, source_queue: str) -> dramatiq.Message[Any]:
    return dramatiq.Message(
        queue_name=JOBS_QUEUE,
        actor_name="record_dead_letter",
        args=(reason, detail, source_queue, None),
        kwargs={},
        options={},
    )


class Ingress(threading.Thread):
    """One consumer thread; reconnects with backoff until stopped."""

    def __init__(
        self,
        settings: Settings,
        sources: list[Source],
        *,
        batch_size: int = 500,
        linger_s: float = 0.02,
    ) -> None:
        super().__init__(name="sessiond-ingress", daemon=True)
        self.settings = settings
        self.sources = sources
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.stopping = threading.Event()
        self.forwarded = 0
        self.dead_lettered = 0

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.join(timeout)

    def run(self) -> None:
        delay = 0.5
        while not self.stopping.is_set():
            try:
                self._consume()
                delay = 0.5
            except (pika.exceptions.AMQPError, OSError) as exc:
                log.warning(
                    "ingress lost RabbitMQ; reconnecting",
                    extra={"error": repr(exc), "retry_in_s": delay},
                )
                self.stopping.wait(delay)
                delay = min(delay * 2, 15.0)
            except Exception:
                log.exception("ingress failed; restarting")
                self.stopping.wait(delay)

    def _consume(self) -> None:
        conn = pika.BlockingConnection(amqp.connection_parameters(self.settings))
        try:
            ch = conn.channel()
            amqp.declare_topology(ch, self.settings)
            for queue in [*partition_queues(self.settings.partitions), JOBS_QUEUE]:
                declare_dramatiq_queue(ch, queue)
            ch.basic_qos(prefetch_count=self.batch_size * 2)
            ch.tx_select()
            pending: list[_Delivery] = []
            for source in self.sources:

                def on_message(
                    _ch: Any, method: Any, props: Any, body: bytes, source: Source = source
                ) -> None:
                    pending.append(_Delivery(source, method, props, body))

                ch.basic_consume(source.queue, on_message)
            log.info("ingress consuming", extra={"queues": [s.queue for s in self.sources]})
            while not self.stopping.is_set():
                conn.process_data_events(time_limit=self.linger_s if pending else 0.2)
                if pending and (len(pending) >= self.batch_size or self._quiet(conn, pending)):
                    batch, pending[:] = list(pending), []
                    self._forward(ch, batch)
        finally:
            if conn.is_open:
                conn.close()  # uncommitted acks roll back: those messages are redelivered

    def _quiet(self, conn: pika.BlockingConnection, pending: list[_Delivery]) -> bool:
        before = len(pending)
        conn.process_data_events(time_limit=0)
        return len(pending) == before

    def _forward(self, ch: Any, batch: list[_Delivery]) -> None:
        received_at = datetime.now(UTC)
        forwarded = dead = 0
        for d in batch:
            try:
                event = d.source.decode(d.body, received_at)
            except InvalidEvent as exc:
                self._dead_letter(ch, d, exc)
                dead += 1
                continue
            if event is None:
                continue
            msg = event_message(event, d.body, self.settings.partitions)
            ch.basic_publish(
                exchange="",
                routing_key=msg.queue_name,
                body=msg.encode(),
                properties=pika.BasicProperties(delivery_mode=2),
            )
            forwarded += 1
        ch.basic_ack(batch[-1].method.delivery_tag, multiple=True)
        ch.tx_commit()
        self.forwarded += forwarded
        self.dead_lettered += dead
        log.debug("ingress batch", extra={"forwarded": forwarded, "dead_lettered": dead})

    def _dead_letter(self, ch: Any, d: _Delivery, exc: InvalidEvent) -> None:
        log.warning(
            "invalid event dead-lettered",
            extra={"reason": exc.reason, "detail": exc.detail, "queue": d.source.queue},
        )
        props = deadletter.properties(
            reason=exc.reason,
            detail=exc.detail,
            source_queue=d.source.queue,
            exchange=d.method.exchange,
            routing_key=d.method.routing_key,
            content_type=d.props.content_type,
        )
        deadletter.publish(ch, self.settings, d.body, props)
        journal = journal_message(exc.reason, exc.detail, d.source.queue)
        ch.basic_publish(
            exchange="",
            routing_key=JOBS_QUEUE,
            body=journal.encode(),
            properties=pika.BasicProperties(delivery_mode=2),
        )


class IngressMiddleware(Middleware):
    """Runs the ingress beside the worker threads of each worker process.

    It stops before the workers do, so the last committed batch is still processed; anything
    consumed but not committed goes back to the queue when its connection closes.
    """

    def __init__(self, settings: Settings, sources: Callable[[], list[Source]]) -> None:
        self.settings = settings
        self.sources = sources
        self.thread: Ingress | None = None

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if not self.settings.ingress:
            return
        self.thread = Ingress(self.settings, self.sources())
        self.thread.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self.thread is not None:
            started = time.monotonic()
            self.thread.stop()
            log.info("ingress stopped", extra={"took_s": round(time.monotonic() - started, 3)})
            self.thread = None
