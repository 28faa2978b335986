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
- ``USER_SESSION_DELETED`` (Keycloak 26.5+: Keycloak removed the session, e.g. expired) →
  ``disconnected`` of that session, reason ``idp_expired`` (CONTRACT §8);
- ``REFRESH_TOKEN`` / ``CODE_TO_TOKEN`` when listed in ``SESSIOND_KEYCLOAK_ACTIVITY_EVENTS`` →
  ``activity`` of the user;
- admin events (``KK.EVENT.ADMIN.…``, ``EventAdminNotificationMqMsg``): ``sessiond.keycloak_admin``;
- any other type (``CODE_TO_TOKEN``, ``REFRESH_TOKEN``, ``LOGIN_ERROR``...) and any failure (an
  ``error`` field, or ``.ERROR.`` in the routing key) → ``None``: acknowledged, counted, ignored.
  A failure never starts (nor ends) a session;
- anything malformed → ``InvalidEvent`` with a stable reason (dead-lettered).

Events carry ``source="keycloak"``, so their de-duplication keys live in their own namespace: the
plugin's ``id`` (Keycloak 22+) with the user when present, else a hash of kind, user, session
and time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from sessiond import keycloak_admin
from sessiond.errors import InvalidEvent
from sessiond.events import (
    MAX_EMAIL,
    MAX_EVENT_ID,
    MAX_NAME,
    MAX_SESSION_ID,
    MAX_USER_ID,
    Event,
    EventKind,
    load_object,
    parse_time,
    text_field,
)

SOURCE: Final = "keycloak"
MAX_IP: Final = 64
KINDS: Final[dict[str, EventKind]] = {
    "LOGIN": "connected",
    "LOGOUT": "disconnected",
    # Keycloak 26.5+: a session Keycloak itself removed (expiry, CONTRACT §8).
    "USER_SESSION_DELETED": "disconnected",
}
END_REASONS: Final[dict[str, str]] = {"USER_SESSION_DELETED": keycloak_admin.IDP_EXPIRED}
# Types ``SESSIOND_KEYCLOAK_ACTIVITY_EVENTS`` may list: activity of their session.
ACTIVITY_TYPES: Final = frozenset({"REFRESH_TOKEN", "CODE_TO_TOKEN"})


def bindings(routing_keys: str) -> list[str]:
    """``SESSIOND_KEYCLOAK_ROUTING_KEYS`` (comma-separated) as a list of binding keys."""
    return [key.strip() for key in routing_keys.split(",") if key.strip()]


def topic_matches(binding_key: str, routing_key: str) -> bool:
    """AMQP topic matching: words split on ``.``, ``*`` is exactly one word, ``#`` zero or more."""
    pattern, words = binding_key.split("."), routing_key.split(".")
    # reachable[j]: the pattern so far can consume exactly the first j words
    reachable = [True] + [False] * len(words)
    for part in pattern:
        if part == "#":
            for j in range(1, len(words) + 1):
                reachable[j] = reachable[j] or reachable[j - 1]
        else:
            reachable = [False] + [
                reachable[j] and (part in ("*", words[j])) for j in range(len(words))
            ]
    return reachable[-1]


def is_error(routing_key: str, obj: dict[str, Any]) -> bool:
    """A failed attempt: the plugin's ``ERROR`` result segment, or an ``error`` field."""
    return ".ERROR." in f".{routing_key}." or obj.get("error") is not None


def _time(value: Any, received_at: datetime) -> datetime:
    """``time`` is epoch milliseconds; absent means the time the message reached us."""
    if value is None:
        return received_at
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidEvent("invalid_occurred_at", "time must be epoch milliseconds")
    try:
        seconds = value / 1000  # an integer too large for a float overflows here
    except OverflowError as exc:
        raise InvalidEvent("invalid_occurred_at", str(exc)[:200]) from None
    return parse_time(seconds, received_at=received_at)


class KeycloakDecoder:
    """Decodes plugin messages; ``counts`` tallies what was seen (``LOGIN``, ``ignored:<TYPE>``,
    ``error:<TYPE>``, ``unbound``) for logs and metrics. Used by one ingress thread: no locking.

    With ``binding_keys``, a message whose routing key matches none of them is acknowledged and
    ignored (``unbound``): AMQP cannot list a queue's bindings, so one removed from
    ``SESSIOND_KEYCLOAK_ROUTING_KEYS`` stays on the queue until unbound by hand, and the
    configuration, not the broker's leftovers, decides what starts a session."""

    def __init__(
        self,
        *,
        max_bytes: int = 64 * 1024,
        binding_keys: Sequence[str] = (),
        activity_types: Sequence[str] = (),
    ) -> None:
        self.max_bytes = max_bytes
        self.binding_keys = tuple(binding_keys)
        self.activity_types = frozenset(activity_types) & ACTIVITY_TYPES
        self.counts: Counter[str] = Counter()

    def __call__(self, body: bytes, received_at: datetime, routing_key: str = "") -> Event | None:
        return self.decode(body, received_at=received_at, routing_key=routing_key)

    def decode(self, body: bytes, *, received_at: datetime, routing_key: str = "") -> Event | None:
        if self.binding_keys and not any(topic_matches(k, routing_key) for k in self.binding_keys):
            self.counts["unbound"] += 1
            return None
        obj = load_object(body, self.max_bytes)
        if keycloak_admin.is_admin_message(routing_key, obj):
            return self._admin(obj, received_at, routing_key)
        event_type = obj.get("type")
        if not isinstance(event_type, str) or not event_type:
            raise InvalidEvent("unknown_event", f"type {event_type!r}"[:100])
        if is_error(routing_key, obj):
            self.counts[f"error:{event_type}"] += 1
            return None
        kind = self._kind(event_type)
        if kind is None:
            self.counts[f"ignored:{event_type}"] += 1
            return None
        event = self._event(obj, kind, received_at)
        self.counts[event_type] += 1
        return event

    def _kind(self, event_type: str) -> EventKind | None:
        """``LOGIN``/``LOGOUT``/``USER_SESSION_DELETED``, and the configured activity types."""
        if event_type in self.activity_types:
            return "activity"
        return KINDS.get(event_type)

    def _admin(self, obj: dict[str, Any], received_at: datetime, routing_key: str) -> Event | None:
        """An admin event (``sessiond.keycloak_admin``); counted like client events."""
        label, event = keycloak_admin.decode_admin(
            obj, received_at=received_at, routing_key=routing_key
        )
        self.counts[label] += 1
        return event

    def _event(self, obj: dict[str, Any], kind: EventKind, received_at: datetime) -> Event:
        user_id = text_field(obj, "userId", MAX_USER_ID, reason="user_id", required=True)
        session_id = text_field(
            obj, "sessionId", MAX_SESSION_ID, reason="session_id", required=True
        )
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
            event_id=text_field(obj, "id", MAX_EVENT_ID, reason="event_id"),
            name=text_field(details, "username", MAX_NAME, reason="name") if connected else None,
            email=text_field(details, "email", MAX_EMAIL, reason="email") if connected else None,
            source=SOURCE,
            ip_address=text_field(obj, "ipAddress", MAX_IP, reason="ip_address")
            if connected
            else None,
            reason=END_REASONS.get(str(obj.get("type"))),
        )
