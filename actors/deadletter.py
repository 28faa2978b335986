"""The dead-letter queue: where an event goes when no retry can apply it, with the reason why.

Messages keep the publisher's original body byte for byte, so ``replay`` can publish them again
exactly as the auth service did; the reason and origin travel in ``x-sessiond-*`` headers.

So does the time the ingress gave the message (``-received-at``, and ``-stamped-at``, the time
an event without its own was given): ``replay`` sends both back, and the ingress decodes the
replayed body with them instead of its own clock. A replayed event is therefore the event it was
(same time, same de-duplication key: a no-op if it was applied meanwhile), and never later than
its first receipt (a ``connected`` that failed while PostgreSQL was down cannot undo the logout
that came after it). Letters written before these headers existed replay at their
``-failed-at`` time, which is still earlier than anything published after the failure.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dramatiq
import pika

from actors import messages
from sessiond import amqp
from sessiond.config import Settings
from sessiond.stamps import parse_stamp

log = logging.getLogger(__name__)

HEADER = "x-sessiond-"
RECEIVED_AT = f"{HEADER}received-at"
STAMPED_AT = f"{HEADER}stamped-at"
REPLAYED = f"{HEADER}replayed"
ACTOR = f"{HEADER}actor"
"""Set on a letter whose body is a Dramatiq message (a job, the journal): ``replay`` puts it back
on its queue, where the event letters go back through their exchange and decoder."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered message as ``dlq list`` shows it."""

    reason: str
    detail: str
    failed_at: str
    source_queue: str
    exchange: str
    routing_key: str
    attempts: int
    body: bytes
    received_at: str = ""
    stamped_at: str = ""
    actor: str = ""

    def to_json(self) -> dict[str, Any]:
        try:
            body: Any = json.loads(self.body)
        except ValueError:
            body = self.body.decode("utf-8", "replace")
        actor = {"actor": self.actor} if self.actor else {}
        return {
            **actor,
            "reason": self.reason,
            "detail": self.detail,
            "failed_at": self.failed_at,
            "source_queue": self.source_queue,
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "attempts": self.attempts,
            "received_at": self.received_at,
            "stamped_at": self.stamped_at,
            "body": body,
        }


def properties(
    *,
    reason: str,
    detail: str,
    source_queue: str,
    exchange: str,
    routing_key: str,
    attempts: int = 0,
    content_type: str | None = None,
    received_at: str | None = None,
    stamped_at: str | None = None,
    actor: str | None = None,
) -> pika.BasicProperties:
    stamps = {RECEIVED_AT: received_at, STAMPED_AT: stamped_at or received_at, ACTOR: actor}
    return pika.BasicProperties(
        delivery_mode=2,
        content_type=content_type,
        timestamp=int(time.time()),
        headers={
            **{k: v for k, v in stamps.items() if v},
            f"{HEADER}reason": reason,
            f"{HEADER}detail": detail[: messages.DETAIL_MAX],
            f"{HEADER}failed-at": datetime.now(UTC).isoformat(),
            f"{HEADER}source-queue": source_queue,
            f"{HEADER}exchange": exchange,
            f"{HEADER}routing-key": routing_key,
            f"{HEADER}attempts": attempts,
        },
    )


def bury(
    channel: Any,
    settings: Settings,
    body: bytes,
    props: pika.BasicProperties,
    journal: dramatiq.Message[Any] | None,
) -> None:
    """The one way into the dead-letter queue: the letter, then the message that journals it
    (``None``: the letter is that journal's own, which must not journal itself again), on the
    caller's channel (the ingress's transaction, or the broker's channel in a worker)."""
    amqp.declare_dead_letters(channel, settings)
    channel.basic_publish(
        exchange="", routing_key=settings.dead_letter_queue, body=body, properties=props
    )
    if journal is not None:
        messages.publish(channel, journal)


def bury_message(channel: Any, settings: Settings, message: Any, reason: str, detail: str) -> None:
    """A Dramatiq message past its retry budget (``actors.retry``), whole: replayed, it is a fresh
    message with a full budget on the queue it came from."""
    fresh = messages.without_retries(message)
    props = properties(
        reason=reason,
        detail=detail,
        source_queue=message.queue_name,
        exchange="",
        routing_key=message.queue_name,
        attempts=int(message.options.get("retries", 0)) + 1,
        content_type="application/json",
        actor=message.actor_name,
    )
    own = message.actor_name == messages.RECORD_DEAD_LETTER
    journal = None if own else messages.dead_letter_journal(reason, detail, message.queue_name)
    bury(channel, settings, fresh.encode(), props, journal)
    log.error(
        "message dead-lettered",
        extra={"actor": message.actor_name, "reason": reason, "detail": detail[:300]},
    )


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _from_message(props: pika.BasicProperties, body: bytes, settings: Settings) -> DeadLetter:
    h = props.headers or {}
    actor = _text(h.get(ACTOR))
    return DeadLetter(
        reason=_text(h.get(f"{HEADER}reason")) or "unknown",
        detail=_text(h.get(f"{HEADER}detail")),
        failed_at=_text(h.get(f"{HEADER}failed-at")),
        source_queue=_text(h.get(f"{HEADER}source-queue")),
        exchange="" if actor else _text(h.get(f"{HEADER}exchange")) or settings.events_exchange,
        routing_key=_text(h.get(f"{HEADER}routing-key")),
        attempts=int(h.get(f"{HEADER}attempts") or 0),
        body=body,
        received_at=_text(h.get(RECEIVED_AT)),
        stamped_at=_text(h.get(STAMPED_AT)),
        actor=actor,
    )


def restored_stamps(headers: dict[str, Any] | None) -> tuple[datetime, datetime] | None:
    """``(received_at, stamped_at)`` of a replayed dead letter, or ``None`` for a fresh message.
    The stamp is never later than the receipt."""
    h = headers or {}
    received = parse_stamp(h.get(RECEIVED_AT))
    if received is None:
        return None
    stamped = parse_stamp(h.get(STAMPED_AT)) or received
    return received, min(stamped, received)


def replay_headers(letter: DeadLetter) -> dict[str, Any]:
    """The stamps a replay carries: the original ones, or the failure time for old letters."""
    received = letter.received_at or letter.failed_at
    if parse_stamp(received) is None:
        return {REPLAYED: 1}
    return {
        RECEIVED_AT: received,
        STAMPED_AT: letter.stamped_at or received,
        REPLAYED: 1,
    }


def listing(settings: Settings, *, limit: int = 100) -> Iterator[DeadLetter]:
    """Reads without consuming: every message is returned to the queue when the channel closes."""
    conn = pika.BlockingConnection(amqp.connection_parameters(settings))
    try:
        ch = conn.channel()
        amqp.declare_topology(ch, settings)
        for _ in range(limit):
            method, props, body = ch.basic_get(settings.dead_letter_queue, auto_ack=False)
            if method is None:
                break
            yield _from_message(props, body, settings)
    finally:
        conn.close()


def replay(settings: Settings, *, limit: int | None = None, reason: str | None = None) -> int:
    """Publishes dead letters again to the exchange they came from, then acks them.

    Each carries its original stamps (``replay_headers``): the ingress gives it the time it was
    given the first time, not the replay's.

    With publisher confirms, a message leaves the dead-letter queue only once the broker has taken
    its copy: a crash in between duplicates it (harmless, events are idempotent), never loses it.
    """
    conn = pika.BlockingConnection(amqp.connection_parameters(settings))
    replayed = 0
    try:
        ch = conn.channel()
        amqp.declare_topology(ch, settings)
        ch.confirm_delivery()
        depth = ch.queue_declare(settings.dead_letter_queue, passive=True).method.message_count
        for _ in range(depth):
            if limit is not None and replayed >= limit:
                break
            method, props, body = ch.basic_get(settings.dead_letter_queue, auto_ack=False)
            if method is None:
                break
            letter = _from_message(props, body, settings)
            if reason is not None and letter.reason != reason:
                continue  # left unacked: back in the queue when the channel closes
            # An event goes back to its exchange and decoder; a Dramatiq message to its queue.
            ch.basic_publish(
                exchange=letter.exchange,
                routing_key=letter.routing_key or "replay",
                body=body,
                properties=pika.BasicProperties(
                    delivery_mode=2,
                    content_type=props.content_type,
                    headers=replay_headers(letter),
                ),
                mandatory=True,
            )
            ch.basic_ack(method.delivery_tag)
            replayed += 1
        log.info("dead letters replayed", extra={"count": replayed})
    finally:
        conn.close()
    return replayed
