"""Keycloak's RabbitMQ event-listener plugin (CONTRACT §7) as sessiond events, in pure code.

The plugin (``keycloak-event-listener-rabbitmq``) publishes every user event to a topic exchange
(``amq.topic`` by default) with routing key
``KK.EVENT.CLIENT.<realm>.<SUCCESS|ERROR>.<client>.<TYPE>`` and a pretty-printed JSON body
(``EventClientNotificationMqMsg``; null fields omitted)::

    {"@class": "...EventClientNotificationMqMsg", "time": 1732521600123, "type": "LOGIN",
     "realmId": "...", "clientId": "web", "userId": "8d2f...", "sessionId": "b71e...",
     "ipAddress": "10.0.0.7", "details": {"auth_method": "openid-connect", "username": "john"}}

Mapping:
- ``LOGIN`` → ``connected`` of session ``sessionId`` of user ``userId`` at ``time`` (epoch ms),
  with ``ipAddress`` and ``details.username`` (as the name) / ``details.email`` when present;
- ``LOGOUT`` → ``disconnected`` of that session;
- any other type (``CODE_TO_TOKEN``, ``REFRESH_TOKEN``, ``LOGIN_ERROR``...) and any failure (an
  ``error`` field, or ``.ERROR.`` in the routing key) → ``None``: acknowledged, counted, ignored.
  A failure never starts (nor ends) a session;
- anything malformed → ``InvalidEvent`` with a stable reason (dead-lettered).

Events carry ``source="keycloak"``, so their de-duplication keys live in their own namespace: the
plugin's ``id`` (Keycloak 22+) when present, else a hash of kind, user, session and time.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime
from typing import Any, Final

from sessiond.errors import InvalidEvent
from sessiond.events import (
    MAX_EMAIL,
    MAX_EVENT_ID,
    MAX_NAME,
    MAX_SESSION_ID,
    MAX_USER_ID,
    Event,
    EventKind,
    parse_time,
)

SOURCE: Final = "keycloak"
MAX_IP: Final = 64
KINDS: Final[dict[str, EventKind]] = {"LOGIN": "connected", "LOGOUT": "disconnected"}


def bindings(routing_keys: str) -> list[str]:
    """``SESSIOND_KEYCLOAK_ROUTING_KEYS`` (comma-separated) as a list of binding keys."""
    return [key.strip() for key in routing_keys.split(",") if key.strip()]


def is_error(routing_key: str, obj: dict[str, Any]) -> bool:
    """A failed attempt: the plugin's ``ERROR`` result segment, or an ``error`` field."""
    return ".ERROR." in f".{routing_key}." or obj.get("error") is not None


def _text(
    obj: dict[str, Any], key: str, limit: int, reason: str, *, required: bool = False
) -> str | None:
    value = obj.get(key)
    if value is None or value == "":
        if required:
            raise InvalidEvent(f"missing_{reason}", f"{key} is absent or empty")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidEvent(f"invalid_{reason}", f"{key} must be a string")
    text = str(value)
    if required and not text.strip():
        raise InvalidEvent(f"missing_{reason}", f"{key} is blank")
    if len(text) > limit or "\x00" in text:
        raise InvalidEvent(f"invalid_{reason}", f"{key} longer than {limit} characters or NUL")
    return text


def _time(value: Any, received_at: datetime) -> datetime:
    """``time`` is epoch milliseconds; absent means the time the message reached us."""
    if value is None:
        return received_at
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidEvent("invalid_occurred_at", "time must be epoch milliseconds")
    return parse_time(value / 1000, received_at=received_at)


class KeycloakDecoder:
    """Decodes plugin messages; ``counts`` tallies what was seen (``LOGIN``, ``ignored:<TYPE>``,
    ``error:<TYPE>``) for logs and metrics. Used by one ingress thread: no locking."""

    def __init__(self, *, max_bytes: int = 64 * 1024) -> None:
        self.max_bytes = max_bytes
        self.counts: Counter[str] = Counter()

    def __call__(self, body: bytes, received_at: datetime, routing_key: str = "") -> Event | None:
        return self.decode(body, received_at=received_at, routing_key=routing_key)

    def decode(self, body: bytes, *, received_at: datetime, routing_key: str = "") -> Event | None:
        if len(body) > self.max_bytes:
            raise InvalidEvent("too_large", f"{len(body)} bytes > {self.max_bytes}")
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise InvalidEvent("not_json", str(exc)[:200]) from None
        if not isinstance(obj, dict):
            raise InvalidEvent("not_object", type(obj).__name__)
        event_type = obj.get("type")
        if not isinstance(event_type, str) or not event_type:
            raise InvalidEvent("unknown_event", f"type {event_type!r}"[:100])
        if is_error(routing_key, obj):
            self.counts[f"error:{event_type}"] += 1
            return None
        kind = KINDS.get(event_type)
        if kind is None:
            self.counts[f"ignored:{event_type}"] += 1
            return None
        event = self._event(obj, kind, received_at)
        self.counts[event_type] += 1
        return event

    def _event(self, obj: dict[str, Any], kind: EventKind, received_at: datetime) -> Event:
        user_id = _text(obj, "userId", MAX_USER_ID, "user_id", required=True)
        session_id = _text(obj, "sessionId", MAX_SESSION_ID, "session_id", required=True)
        assert user_id is not None and session_id is not None
        details = obj.get("details")
        if details is not None and not isinstance(details, dict):
            raise InvalidEvent("invalid_details", "details must be an object")
        details = details or {}
        connected = kind == "connected"
        return Event(
            kind=kind,
            user_id=user_id,
            occurred_at=_time(obj.get("time"), received_at),
            session_id=session_id,
            event_id=_text(obj, "id", MAX_EVENT_ID, "event_id"),
            name=_text(details, "username", MAX_NAME, "name") if connected else None,
            email=_text(details, "email", MAX_EMAIL, "email") if connected else None,
            source=SOURCE,
            ip_address=_text(obj, "ipAddress", MAX_IP, "ip_address") if connected else None,
        )
