"""What the ingress reads: one ``Source`` per ingest queue (a queue, how to declare it, how to
decode its bodies).

The auth service's queue always (CONTRACT §1), and with ``SESSIOND_KEYCLOAK_EXCHANGE`` set,
sessiond's own durable queue ``SESSIOND_KEYCLOAK_QUEUE`` bound to that exchange with each of
``SESSIOND_KEYCLOAK_ROUTING_KEYS`` (Keycloak's event-listener plugin, CONTRACT §7). Both are
declared with a single active consumer (``sessiond.amqp.INGEST_QUEUE_ARGUMENTS``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sessiond import amqp, keycloak
from sessiond.config import Settings
from sessiond.events import Event, decode_event

Decoder = Callable[[bytes, datetime, str], Event | None]
"""Turns a body (and its routing key) into an event; ``None`` means "valid but nothing to do"
(e.g. a Keycloak event type sessiond ignores); ``InvalidEvent`` means dead-letter it, and so
does any other exception (reason ``undecodable``)."""

Declare = Callable[[Any], None]
"""Declares a source's queue and bindings on a channel (idempotent)."""


@dataclass(frozen=True, slots=True)
class Source:
    queue: str
    decode: Decoder
    declare: Declare | None = None
    name: str = "auth"
    bindings: tuple[tuple[str, str], ...] = ()
    """``(exchange, routing key)`` pairs of the queue: taken off a legacy queue being drained."""


def auth_source(settings: Settings) -> Source:
    """The auth service's queue (CONTRACT §1); ``amqp.declare_topology`` declares it."""

    def decode(body: bytes, received_at: datetime, routing_key: str = "") -> Event:
        return decode_event(body, received_at=received_at, max_bytes=settings.max_event_bytes)

    return Source(settings.ingest_queue, decode, bindings=((settings.events_exchange, "#"),))


def keycloak_source(settings: Settings) -> Source:
    """Keycloak's plugin messages (CONTRACT §7) from our own durable queue on its exchange."""
    exchange = settings.keycloak_exchange
    if not exchange:
        raise ValueError("SESSIOND_KEYCLOAK_EXCHANGE is not set")
    keys = keycloak.bindings(settings.keycloak_routing_keys)
    decoder = keycloak.KeycloakDecoder(
        max_bytes=settings.max_event_bytes,
        binding_keys=keys,
        activity_types=settings.keycloak_activity_types,
    )

    def declare(ch: Any) -> None:
        # ``amq.*`` exchanges exist in every vhost and may not be declared by clients.
        if exchange.startswith("amq."):
            ch.exchange_declare(exchange, exchange_type="topic", passive=True)
        else:
            ch.exchange_declare(exchange, exchange_type="topic", durable=True)
        amqp.declare_queue(ch, settings, settings.keycloak_queue, amqp.INGEST_QUEUE_ARGUMENTS)
        for key in keys:
            ch.queue_bind(settings.keycloak_queue, exchange, routing_key=key)

    return Source(
        settings.keycloak_queue,
        decoder,
        declare,
        name=keycloak.SOURCE,
        bindings=tuple((exchange, key) for key in keys),
    )


def sources_for(settings: Settings) -> list[Source]:
    """Every source the settings ask for: auth always, Keycloak when its exchange is set."""
    found = [auth_source(settings)]
    if settings.keycloak_exchange:
        found.append(keycloak_source(settings))
    return found
