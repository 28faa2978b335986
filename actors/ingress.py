"""The ingress: plain JSON events from the auth service in, partitioned Dramatiq messages out.

The publisher knows nothing of Dramatiq (CONTRACT §1), so a small consumer in every worker process
reads the durable queues of ``actors.sources``, validates each body, and republishes it as a
Dramatiq message to the partition queue of its user, or to the dead-letter queue with a reason.
The channel is in AMQP transaction mode with two commits per batch: its publishes (partition
messages, dead letters, the high-water stamp), then the acks of its inputs. RabbitMQ's
transactions are not atomic across queues ("Broker Semantics"): one commit cut short by a broker
shutdown could settle the acks and drop a publish. Acking only after the publishes' commit-ok
(stored) makes a crash anywhere redeliver instead: duplicates, which are harmless.

Order: each ingest queue has a single active consumer (the other processes' consumers wait), and
it gives every message a stamp that never goes backwards (``sessiond.stamps``), also across a
hand-over (``actors.topology`` keeps the high-water stamp in RabbitMQ). An event without a time of
its own takes that stamp (or the publisher's AMQP ``timestamp``), so for those events queue order
is event order. A replayed dead letter, and a copy of an event with an ``event_id``, get back
the stamps they were first given (``actors.stamping``).

No message can stop a queue: whatever a decoder raises dead-letters that one message (reason
``undecodable``, the exception in ``x-sessiond-detail``) and the batch goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import dramatiq
import pika
import pika.exceptions
from dramatiq.middleware import Middleware

from actors import deadletter, messages, topology
from actors.forwarding import Stamps, event_item, partition_messages, with_stamp
from actors.sources import Source
from actors.stamping import (
    ReceiptsUnavailable,
    Remember,
    Settlement,
    Stamper,
    first_receipts,
)
from actors.topology import JOBS_QUEUE, declare_dramatiq_queue, partition_queues
from sessiond import amqp, keycloak
from sessiond.config import Settings
from sessiond.errors import InvalidEvent, SessiondError
from sessiond.events import Event
from sessiond.stamps import Clock, utc_now

log = logging.getLogger(__name__)

SKEW_WARNING = timedelta(seconds=1)
MAX_RESTART_S = 15.0
MAX_RECONNECT_S = 2.0


class QueueMismatch(SessiondError):
    """An ingest queue exists with other arguments than ours (e.g. without a single active
    consumer) and has no versioned successor to migrate to."""


class LegacyBusy(SessiondError):
    """A legacy ingest queue still has other consumers (older workers): wait for them to go."""


@dataclass(slots=True)
class _Delivery:
    source: Source
    method: Any
    props: pika.BasicProperties
    body: bytes


class Ingress(threading.Thread):
    """One consumer thread; reconnects with backoff until stopped."""

    def __init__(
        self,
        settings: Settings,
        sources: list[Source],
        remember: Remember,
        *,
        batch_size: int = 500,
        linger_s: float = 0.02,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(name="sessiond-ingress", daemon=True)
        self.settings = settings
        self.sources = sources
        self.remember = remember  # first receipts (``actors.stamping``), on PostgreSQL
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.stopping = threading.Event()
        self.forwarded = 0
        self.dead_lettered = 0
        self.ignored: Counter[str] = Counter()
        self.report_every_s = 60.0
        self._reported_at = time.monotonic()
        # Kept across reconnections: this process's stamps never go backwards either.
        self.stamper = Stamper(clock)
        self.clock = self.stamper.clock
        self.settlement = Settlement()  # which stored first receipts were committed
        self._high_water_read: set[str] = set()
        self._high_water_tags: list[int] = []
        self._committed = False

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.join(timeout)

    def run(self) -> None:
        """Restarts after a failure with a delay doubling from 0.5 s to ``MAX_RESTART_S`` (a
        failure that repeats is no busy loop); a broker that is away is retried every
        ``MAX_RECONNECT_S`` at most, as events published once it is back wait in the ingest
        queue meanwhile (docs/reliability.md, "late, not lost")."""
        delay = 0.5
        while not self.stopping.is_set():
            self._committed = False
            cap = MAX_RESTART_S
            try:
                self._consume()
                delay = 0.5
                continue
            except LegacyBusy as exc:
                log.warning("ingress waits for a legacy queue", extra={"detail": str(exc)})
            except QueueMismatch as exc:
                log.error("ingress cannot declare its queue", extra={"detail": str(exc)})
            except ReceiptsUnavailable as exc:  # the batch is read again when PostgreSQL is back
                cap = MAX_RECONNECT_S
                delay = min(delay, cap)
                log.warning("ingress waits for PostgreSQL", extra={"error": str(exc)})
            except (pika.exceptions.AMQPError, OSError) as exc:
                cap = MAX_RECONNECT_S
                delay = min(delay, cap)
                log.warning(
                    "ingress lost RabbitMQ; reconnecting",
                    extra={"error": repr(exc), "retry_in_s": delay},
                )
            except Exception:
                log.exception("ingress failed; restarting", extra={"retry_in_s": delay})
            if self._committed:
                delay = 0.5  # it worked for a while: the next failure is a new one
            self.stopping.wait(delay)
            delay = min(delay * 2, cap)

    def _declare(self, ch: Any) -> None:
        try:
            amqp.declare_topology(ch, self.settings)
            for source in self.sources:
                if source.declare is not None:
                    source.declare(ch)
                topology.declare_stamp_queue(ch, self.settings, source.queue)
        except amqp.QueueTypeMismatch as exc:
            raise QueueMismatch(str(exc)) from None
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 406:
                raise
            raise QueueMismatch(
                f"{exc.reply_text}; an ingest queue needs x-single-active-consumer, which "
                "RabbitMQ cannot add to an existing queue: name a new one ending in "
                f"{topology.VERSION_SUFFIX!r} (SESSIOND_INGEST_QUEUE / SESSIOND_KEYCLOAK_QUEUE) "
                "and sessiond drains the old one into it"
            ) from None
        for queue in [*partition_queues(self.settings.partitions), JOBS_QUEUE]:
            declare_dramatiq_queue(ch, self.settings, queue)

    def _consume(self) -> None:
        conn = pika.BlockingConnection(amqp.connection_parameters(self.settings))
        try:
            ch = conn.channel()
            self._declare(ch)
            ch.basic_qos(prefetch_count=self.batch_size * 2)
            ch.tx_select()
            self._high_water_read, self._high_water_tags = set(), []
            pending: list[_Delivery] = []
            for source in self.sources:
                legacy = topology.legacy_queue(source.queue)
                if legacy is not None and topology.queue_exists(conn, legacy):
                    self._drain_legacy(conn, ch, source, legacy, pending)
            for source in self.sources:
                ch.basic_consume(source.queue, self._collector(pending, source))
            log.info("ingress consuming", extra={"queues": [s.queue for s in self.sources]})
            while not self.stopping.is_set():
                self._step(conn, ch, pending)
        finally:
            if conn.is_open:
                conn.close()  # uncommitted acks roll back: those messages are redelivered

    def _collector(self, pending: list[_Delivery], source: Source) -> Callable[..., None]:
        def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
            pending.append(_Delivery(source, method, props, body))

        return on_message

    def _step(self, conn: pika.BlockingConnection, ch: Any, pending: list[_Delivery]) -> bool:
        """Reads for a moment, forwards a batch when one is ready; False when nothing came."""
        conn.process_data_events(time_limit=self.linger_s if pending else 0.2)
        if pending and (len(pending) >= self.batch_size or self._quiet(conn, pending)):
            batch, pending[:] = list(pending), []
            self._forward(ch, batch)
            return True
        return bool(pending)

    def _drain_legacy(
        self,
        conn: pika.BlockingConnection,
        ch: Any,
        source: Source,
        legacy: str,
        pending: list[_Delivery],
    ) -> None:
        """Takes the legacy queue off its exchange, forwards its backlog as the only consumer
        (exclusive: refused while older workers still read it), then deletes it. Messages routed
        to both queues in the instant between binding the new one and unbinding this one are
        read twice, the second copy after the first and before anything later: a repeat that
        leaves every session as the first reading did."""
        for exchange, key in source.bindings:
            ch.queue_unbind(legacy, exchange, routing_key=key)
        before = topology.queue_depth(conn, legacy)
        log.warning(
            "draining legacy ingest queue",
            extra={"queue": legacy, "into": source.queue, "messages": before},
        )
        try:
            tag = ch.basic_consume(legacy, self._collector(pending, source), exclusive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 403:
                raise LegacyBusy(f"{legacy} is still consumed by older workers") from None
            raise
        while not self.stopping.is_set():
            if not self._step(conn, ch, pending) and topology.queue_depth(conn, legacy) == 0:
                break
        ch.basic_cancel(tag)
        if pending:
            batch, pending[:] = list(pending), []
            self._forward(ch, batch)
        if self.stopping.is_set():
            return
        ch.queue_delete(legacy, if_empty=True)  # not empty after all: 406, reconnect, drain again
        log.warning("legacy ingest queue drained and deleted", extra={"queue": legacy})

    def _quiet(self, conn: pika.BlockingConnection, pending: list[_Delivery]) -> bool:
        before = len(pending)
        conn.process_data_events(time_limit=0)
        return len(pending) == before

    def _read_high_water(self, ch: Any, source: Source) -> None:
        """Once per connection and source, before its first stamp: start above the newest stamp
        any earlier active consumer committed, which is also what its receipts count up to
        (``actors.stamping.Settlement``)."""
        self._high_water_read.add(source.name)
        stamp, tag = topology.read_high_water(ch, source.queue)
        if tag is not None:
            self._high_water_tags.append(tag)
        if stamp is not None:
            if stamp > utc_now() + SKEW_WARNING:
                log.warning(
                    "high-water stamp ahead of this clock; stamping after it",
                    extra={"queue": source.queue, "high_water": stamp.isoformat()},
                )
            self.clock.advance_to(stamp)
        self.settlement.started(source.name, stamp, self.clock.mark())

    def _forward(self, ch: Any, batch: list[_Delivery]) -> None:
        forwarded = dead = 0
        ignored: Counter[str] = Counter()
        items: list[tuple[str, dict[str, Any]]] = []
        sources = {d.source.name: d.source for d in batch}
        for source in sources.values():
            if source.name not in self._high_water_read:
                self._read_high_water(ch, source)
        decoded: list[tuple[_Delivery, Event, Stamps]] = []
        for d in batch:
            stamps = self.stamper.stamps(d.props.headers, d.props.timestamp)
            try:
                event = d.source.decode(d.body, stamps.received_at, d.method.routing_key or "")
            except InvalidEvent as exc:
                self._dead_letter(ch, d, exc.reason, exc.detail, stamps)
                dead += 1
                continue
            except Exception as exc:  # a decoder's bug must not stop the queue
                log.exception("undecodable message dead-lettered", extra={"queue": d.source.queue})
                self._dead_letter(ch, d, "undecodable", repr(exc), stamps)
                dead += 1
                continue
            if event is None:
                ignored[d.source.name] += 1
            else:
                decoded.append((d, event, stamps))
        # Before anything is committed: PostgreSQL down fails the batch, which is read again.
        firsts = first_receipts(
            [(d.source.name, e, s) for d, e, s in decoded], self.remember, self.settlement
        )
        for (d, _e, _s), (event, stamps) in zip(decoded, firsts, strict=True):
            event = with_stamp(event, stamps)
            key = d.method.routing_key or ""
            try:
                item = event_item(event, d.body, d.method.exchange, key, stamps)
            except Exception as exc:  # e.g. a body a custom decoder took that is not UTF-8
                self._dead_letter(ch, d, "undecodable", repr(exc), stamps)
                dead += 1
                continue
            items.append((event.user_id, item))
            forwarded += 1
        for msg in partition_messages(items, self.settings.partitions):
            messages.publish(ch, msg)
        if self.clock.last is not None:
            for source in sources.values():
                topology.write_high_water(ch, source.queue, self.clock.last)
        ch.tx_commit()  # stored by RabbitMQ before any input is acknowledged
        if self.clock.last is not None:  # the batch's receipts now count
            self.settlement.committed(list(sources), self.clock.last)
        last_tag = int(batch[-1].method.delivery_tag)
        for tag in self._high_water_tags:
            if tag > last_tag:  # a lower tag is covered by the multiple ack below
                ch.basic_ack(tag)
        self._high_water_tags.clear()
        ch.basic_ack(last_tag, multiple=True)
        ch.tx_commit()
        self._committed = True
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

    def _dead_letter(self, ch: Any, d: _Delivery, reason: str, detail: str, stamps: Stamps) -> None:
        log.warning(
            "invalid event dead-lettered",
            extra={"reason": reason, "detail": detail[:300], "queue": d.source.queue},
        )
        props = deadletter.properties(
            reason=reason,
            detail=detail,
            source_queue=d.source.queue,
            exchange=d.method.exchange,
            routing_key=d.method.routing_key,
            content_type=d.props.content_type,
            received_at=stamps.received_at.isoformat(),
            stamped_at=stamps.stamped_at.isoformat(),
        )
        journal = messages.dead_letter_journal(reason, detail, d.source.queue)
        deadletter.bury(ch, self.settings, d.body, props, journal)


class IngressMiddleware(Middleware):
    """Runs the ingress beside the worker threads of each worker process.

    It stops before the workers do, so the last committed batch is still processed; anything
    consumed but not committed goes back to the queue when its connection closes.
    """

    def __init__(
        self, settings: Settings, sources: Callable[[], list[Source]], remember: Remember
    ) -> None:
        self.settings = settings
        self.sources = sources
        self.remember = remember
        self.thread: Ingress | None = None

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if not self.settings.ingress:
            return
        self.thread = Ingress(self.settings, self.sources(), self.remember)
        self.thread.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self.thread is not None:
            started = time.monotonic()
            self.thread.stop()
            took = round(time.monotonic() - started, 3)
            log.info("ingress stopped", extra={"took_s": took, **self.thread.totals()})
            self.thread = None
