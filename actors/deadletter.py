"""The dead-letter queue: where an event goes when no retry can apply it, with the reason why.

Messages keep the publisher's original body byte for byte, so ``replay`` can publish them again
exactly as the auth service did; the reason and origin travel in ``x-sessiond-*`` headers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika

from sessiond import amqp
from sessiond.config import Settings

log = logging.getLogger(__name__)

HEADER = "x-sessiond-"


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

    def to_json(self) -> dict[str, Any]:
        try:
            body: Any = json.loads(self.body)
        except ValueError:
            body = self.body.decode("utf-8", "replace")
        return {
            "reason": self.reason,
            "detail": self.detail,
            "failed_at": self.failed_at,
            "source_queue": self.source_queue,
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "attempts": self.attempts,
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
) -> pika.BasicProperties:
    return pika.BasicProperties(
        delivery_mode=2,
        content_type=content_type,
        timestamp=int(time.time()),
        headers={
            f"{HEADER}reason": reason,
            f"{HEADER}detail": detail[:1000],
            f"{HEADER}failed-at": datetime.now(UTC).isoformat(),
            f"{HEADER}source-queue": source_queue,
            f"{HEADER}exchange": exchange,
            f"{HEADER}routing-key": routing_key,
            f"{HEADER}attempts": attempts,
        },
    )


def publish(channel: Any, settings: Settings, body: bytes, props: pika.BasicProperties) -> None:
    channel.basic_publish(
        exchange="", routing_key=settings.dead_letter_queue, body=body, properties=props
    )


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _from_message(props: pika.BasicProperties, body: bytes, settings: Settings) -> DeadLetter:
    h = props.headers or {}
    return DeadLetter(
        reason=_text(h.get(f"{HEADER}reason")) or "unknown",
        detail=_text(h.get(f"{HEADER}detail")),
        failed_at=_text(h.get(f"{HEADER}failed-at")),
        source_queue=_text(h.get(f"{HEADER}source-queue")),
        exchange=_text(h.get(f"{HEADER}exchange")) or settings.events_exchange,
        routing_key=_text(h.get(f"{HEADER}routing-key")),
        attempts=int(h.get(f"{HEADER}attempts") or 0),
        body=body,
    )


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
            ch.basic_publish(
                exchange=letter.exchange,
                routing_key=letter.routing_key or "replay",
                body=body,
                properties=pika.BasicProperties(delivery_mode=2, content_type=props.content_type),
                mandatory=True,
            )
            ch.basic_ack(method.delivery_tag)
            replayed += 1
        log.info("dead letters replayed", extra={"count": replayed})
    finally:
        conn.close()
    return replayed
