"""A test consumer of the lifecycle events out: what a downstream service would bind."""

from __future__ import annotations

import json
from typing import Any

import pika
import pika.exceptions

from actors.outbox import declare_exchange
from sessiond import amqp
from sessiond.config import Settings


class EventsOut:
    """A durable queue bound to ``SESSIOND_EVENTS_OUT_EXCHANGE`` with ``#``, read with
    ``basic_get``; ``received`` keeps every message (body, routing key, properties) in order."""

    def __init__(
        self, settings: Settings, queue: str = "test.events-out", *, purge: bool = True
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.conn = pika.BlockingConnection(amqp.connection_parameters(settings))
        self.ch = self.conn.channel()
        declare_exchange(self.ch, settings)
        self.ch.queue_declare(queue, durable=True)
        self.ch.queue_bind(queue, settings.events_out_exchange, routing_key="#")
        if purge:
            self.ch.queue_purge(queue)
        self.received: list[tuple[dict[str, Any], str, pika.BasicProperties]] = []

    def poll(self) -> list[dict[str, Any]]:
        """Everything that arrived so far (acknowledged), as bodies."""
        while True:
            method, props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                break
            self.received.append((json.loads(body), method.routing_key, props))
        return [body for body, _, _ in self.received]

    def of(self, *user_ids: str) -> list[tuple[str, str | None, str | None]]:
        """``(type, session_id, reason)`` of the given users' events, in arrival order."""
        return [
            (b["type"], b["session_id"], b["reason"])
            for b in self.poll()
            if b["user_id"] in user_ids
        ]

    @classmethod
    def reconnect(cls, settings: Settings, queue: str) -> EventsOut | None:
        """The same durable queue, keeping what arrived meanwhile; ``None`` while the broker is
        not reachable yet."""
        try:
            return cls(settings, queue, purge=False)
        except pika.exceptions.AMQPError:
            return None

    def close(self) -> None:
        if self.conn.is_open:
            self.ch.queue_delete(self.queue)
            self.conn.close()
