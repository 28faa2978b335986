"""The ingress: plain JSON events from the auth service in, partitioned Dramatiq messages out.

The publisher knows nothing of Dramatiq (CONTRACT §1), so a small consumer in every worker process
reads the durable queue bound to the events exchange, validates each body, and republishes it as a
Dramatiq message to the partition queue of its user, or to the dead-letter queue with a reason.
The channel is in AMQP transaction mode: a batch's publishes and the acknowledgement of its inputs
commit together, so a crash in between redelivers the batch (duplicates are harmless) and loses
nothing.

Sources are pluggable (``Source``: a queue, how to declare it, how to decode its bodies): the auth
service's queue always, and with ``SESSIOND_KEYCLOAK_EXCHANGE`` set, sessiond's own durable queue
``SESSIOND_KEYCLOAK_QUEUE`` bound to that exchange with each of ``SESSIOND_KEYCLOAK_ROUTING_KEYS``
(``sessiond.keycloak``: Keycloak's event-listener plugin, CONTRACT §7).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
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
from sessiond import amqp, keycloak
from sessiond.config import Settings
from sessiond.errors import InvalidEvent
from sessiond.events import Event, decode_event, partition_of, partition_queue

log = logging.getLogger(__name__)

Decoder = Callable[[bytes, datetime, str], Event | None]
"""Turns a body (and its routing key) into an event; ``None`` means "valid but nothing to do"
(e.g. a Keycloak event type sessiond ignores); ``InvalidEvent`` means dead-letter it."""

Declare = Callable[[Any], None]
"""Declares a source's queue and bindings on a channel (idempotent)."""


@dataclass(frozen=True, slots=True)
class Source:
    queue: str
    decode: Decoder
    declare: Declare | None = None
    name: str = "auth"


def auth_source(settings: Settings) -> Source:
    """The auth service's queue (CONTRACT §1); ``amqp.declare_topology`` declares it."""

    def decode(body: bytes, received_at: datetime, routing_key: str = "") -> Event:
        return decode_event(body, received_at=received_at, max_bytes=settings.max_event_bytes)

    return Source(settings.ingest_queue, decode)


def keycloak_source(settings: Settings) -> Source:
    """Keycloak's plugin messages (CONTRACT §7) from our own durable queue on its exchange."""
    exchange = settings.keycloak_exchange
    if not exchange:
        raise ValueError("SESSIOND_KEYCLOAK_EXCHANGE is not set")
    decoder = keycloak.KeycloakDecoder(
        max_bytes=settings.max_event_bytes,
        binding_keys=keycloak.bindings(settings.keycloak_routing_keys),
        activity_types=settings.keycloak_activity_types,
    )

    def declare(ch: Any) -> None:
        # ``amq.*`` exchanges exist in every vhost and may not be declared by clients.
        if exchange.startswith("amq."):
            ch.exchange_declare(exchange, exchange_type="topic", passive=True)
        else:
            ch.exchange_declare(exchange, exchange_type="topic", durable=True)
        ch.queue_declare(settings.keycloak_queue, durable=True)
        for key in keycloak.bindings(settings.keycloak_routing_keys):
            ch.queue_bind(settings.keycloak_queue, exchange, routing_key=key)

    return Source(settings.keycloak_queue, decoder, declare, name=keycloak.SOURCE)


def sources_for(settings: Settings) -> list[Source]:
    """Every source the settings ask for: auth always, Keycloak when its exchange is set."""
    found = [auth_source(settings)]
    if settings.keycloak_exchange:
        found.append(keycloak_source(settings))
    return found


@dataclass(slots=True)
class _Delivery:
    source: Source
    method: Any
    props: pika.BasicProperties
    body: bytes


def event_item(event: Event, raw: bytes, exchange: str, routing_key: str) -> dict[str, Any]:
    """One event as it travels to its partition: validated, plus the original body and where it
    came from, so that a dead letter can be replayed exactly as it was published."""
    return {
        "event": event.to_wire(),
        "raw": raw.decode("utf-8"),
        "exchange": exchange,
        "routing_key": routing_key,
    }


def partition_messages(
    items: list[tuple[str, dict[str, Any]]], partitions: int
) -> list[dramatiq.Message[Any]]:
    """One Dramatiq message per partition for a batch of ``(user_id, item)``, in arrival order:
    the partition's actor applies them in one transaction."""
    grouped: dict[int, list[dict[str, Any]]] = {}
    for user_id, item in items:
        grouped.setdefault(partition_of(user_id, partitions), []).append(item)
    return [
        dramatiq.Message(
            queue_name=partition_queue(index),
            actor_name=actor_name(index),
            args=(batch,),
            kwargs={},
            options={},
        )
        for index, batch in sorted(grouped.items())
    ]


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
        self.ignored: Counter[str] = Counter()
        self.report_every_s = 60.0
        self._reported_at = time.monotonic()

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
            for source in self.sources:
                if source.declare is not None:
                    source.declare(ch)
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
        ignored: Counter[str] = Counter()
        items: list[tuple[str, dict[str, Any]]] = []
        for d in batch:
            try:
                event = d.source.decode(d.body, received_at, d.method.routing_key or "")
            except InvalidEvent as exc:
                self._dead_letter(ch, d, exc)
                dead += 1
                continue
            if event is None:
                ignored[d.source.name] += 1
                continue
            item = event_item(event, d.body, d.method.exchange, d.method.routing_key or "")
            items.append((event.user_id, item))
            forwarded += 1
        for msg in partition_messages(items, self.settings.partitions):
            ch.basic_publish(
                exchange="",
                routing_key=msg.queue_name,
                body=msg.encode(),
                properties=pika.BasicProperties(delivery_mode=2),
            )
        ch.basic_ack(batch[-1].method.delivery_tag, multiple=True)
        ch.tx_commit()
        self.forwarded += forwarded
        self.dead_lettered += dead
        self.ignored.update(ignored)
        log.debug(
            "ingress batch",
            extra={"forwarded": forwarded, "dead_lettered": dead, "ignored": dict(ignored)},
        )
        if time.monotonic() - self._reported_at >= self.report_every_s:
            self._reported_at = time.monotonic()
            log.info("ingress totals", extra=self.totals())

    def totals(self) -> dict[str, Any]:
        """Running counts: forwarded, dead-lettered, ignored per source, and what each Keycloak
        decoder saw (``LOGIN``, ``ignored:<TYPE>``, ``error:<TYPE>``)."""
        return {
            "forwarded": self.forwarded,
            "dead_lettered": self.dead_lettered,
            "ignored": dict(self.ignored),
            "decoded": {
                s.name: dict(s.decode.counts)
                for s in self.sources
                if isinstance(s.decode, keycloak.KeycloakDecoder)
            },
        }

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
            took = round(time.monotonic() - started, 3)
            log.info("ingress stopped", extra={"took_s": took, **self.thread.totals()})
            self.thread = None
