"""Keycloak admin events (CONTRACT §8) as sessiond revocations, in pure code.

The RabbitMQ plugin (aznamier/keycloak-event-listener-rabbitmq) publishes every admin event as
``EventAdminNotificationMqMsg`` (``EventAdminNotificationMqMsg.create``: a copy of Keycloak's
``AdminEvent``; pretty JSON, null fields omitted) under the routing key of
``RabbitMqConfig.calculateRoutingKey(AdminEvent, ...)``:
``KK.EVENT.ADMIN.<realm>.<SUCCESS|ERROR>.<RESOURCE_TYPE>.<OPERATION>``::

    {"@class": "com.github.aznamier.keycloak.event.provider.EventAdminNotificationMqMsg",
     "time": 1596951200408, "realmId": "<realm id>",
     "authDetails": {"realmId": "master", "clientId": "...", "userId": "...", "ipAddress": "..."},
     "resourceType": "USER", "operationType": "UPDATE", "resourcePath": "users/<id>",
     "representation": "{\\"enabled\\":false,...}", "resourceTypeAsString": "USER"}

``resourcePath`` is the request path relative to ``/admin/realms/<realm>/``
(``AdminEventBuilder.resourcePath(UriInfo)``); ``representation`` is a JSON *string*
(``AdminEventBuilder.representation``: ``JsonSerialization.writeValueAsString``), present only
when the realm includes representations. What Keycloak's admin REST resources send:

- ``RealmAdminResource.deleteSession``: ``USER_SESSION``/``DELETE``, ``sessions/<sid>``: that
  session ends, its owner looked up (``idp_admin``);
- ``UserResource.logout``: ``USER``/``ACTION``, ``users/<id>/logout``: all the user's sessions
  end (``idp_admin``);
- ``UserResource.deleteUser``: ``USER``/``DELETE``, ``users/<id>``: the user is blocked
  (``storage.block``: all sessions end, later logins refused; ``idp_user_deleted``);
- ``UserResource.updateUser``: ``USER``/``UPDATE``, ``users/<id>``: blocked when the
  representation (the request's body) says ``"enabled": false`` (``idp_user_disabled``), and
  that block lifted when it says ``"enabled": true``;
- ``RealmAdminResource.logoutAll``: ``REALM``/``ACTION``, ``logout-all``: every user with an
  open Keycloak session is logged out (``idp_admin``).

Every other admin event, and every ``ERROR`` one, changes nothing (counted
``ignored:ADMIN.<RT>.<OP>`` / ``error:ADMIN.<RT>.<OP>``). A body that is not such a message is
dead-lettered with a reason (``invalid_operation_type``, ``invalid_resource_type``,
``invalid_resource_path``, ``invalid_representation``, ``invalid_user_id``, ...).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Final

from sessiond.errors import InvalidEvent
from sessiond.events import (
    MAX_EVENT_ID,
    MAX_SESSION_ID,
    MAX_USER_ID,
    Event,
    EventKind,
    parse_time,
    text_field,
)

SOURCE: Final = "keycloak"
ADMIN_PREFIX: Final = "KK.EVENT.ADMIN."
ADMIN_CLASS: Final = "EventAdminNotificationMqMsg"
OPERATIONS: Final = frozenset({"CREATE", "UPDATE", "DELETE", "ACTION"})
MAX_PATH: Final = 1024
MAX_REPRESENTATION: Final = 32 * 1024

IDP_ADMIN: Final = "idp_admin"
IDP_USER_DISABLED: Final = "idp_user_disabled"
IDP_USER_DELETED: Final = "idp_user_deleted"
IDP_EXPIRED: Final = "idp_expired"

_SESSION_PATH: Final = re.compile(r"sessions/([^/]+)")
_USER_PATH: Final = re.compile(r"users/([^/]+)")
_USER_LOGOUT_PATH: Final = re.compile(r"users/([^/]+)/logout")
LOGOUT_ALL_PATH: Final = "logout-all"


def is_admin_message(routing_key: str, obj: dict[str, Any]) -> bool:
    """An admin event: by its routing key, or (replayed by hand, say) by its class or shape."""
    if routing_key.startswith(ADMIN_PREFIX):
        return True
    if routing_key.startswith("KK.EVENT.CLIENT."):
        return False
    klass = obj.get("@class")
    if isinstance(klass, str) and klass.endswith(ADMIN_CLASS):
        return True
    return "type" not in obj and "operationType" in obj


def lookup_user_id(realm: str | None) -> str:
    """The routing placeholder of an event whose users are looked up (``Event.lookup``)."""
    return f"keycloak-admin:{realm or ''}"[:MAX_USER_ID]


def _word(obj: dict[str, Any], key: str, reason: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value or len(value) > 64:
        raise InvalidEvent(reason, f"{key} {value!r}"[:100])
    return value


def _time(value: Any, received_at: datetime) -> datetime:
    if value is None:
        return received_at
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidEvent("invalid_occurred_at", "time must be epoch milliseconds")
    return parse_time(value / 1000, received_at=received_at)


def _path_id(path: str, pattern: re.Pattern[str], limit: int, reason: str) -> str | None:
    match = pattern.fullmatch(path)
    if match is None:
        return None
    return text_field({"id": match.group(1)}, "id", limit, reason=reason, required=True)


def representation(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The representation as an object: the plugin sends Keycloak's JSON string; an object is
    taken as it is. Absent (the realm does not include representations): ``None``."""
    raw = obj.get("representation")
    if raw is None or raw == "":
        return None
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str) or len(raw) > MAX_REPRESENTATION:
        raise InvalidEvent("invalid_representation", "representation must be a JSON string")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidEvent("invalid_representation", str(exc)[:200]) from None
    if not isinstance(value, dict):
        raise InvalidEvent("invalid_representation", "representation is not an object")
    return value


def decode_admin(
    obj: dict[str, Any], *, received_at: datetime, routing_key: str = ""
) -> tuple[str, Event | None]:
    """``(count label, event)``: the event to apply, or ``None`` for an admin event that changes
    nothing; ``InvalidEvent`` for a body that is not a well-formed admin event."""
    operation = _word(obj, "operationType", "invalid_operation_type")
    if operation not in OPERATIONS:
        raise InvalidEvent("invalid_operation_type", operation)
    resource = obj.get("resourceType") or obj.get("resourceTypeAsString")
    resource = _word({"r": resource}, "r", "invalid_resource_type")
    label = f"ADMIN.{resource}.{operation}"
    path = obj.get("resourcePath")
    if path is not None and (not isinstance(path, str) or len(path) > MAX_PATH):
        raise InvalidEvent("invalid_resource_path", "resourcePath must be a string")
    at = _time(obj.get("time"), received_at)
    if ".ERROR." in f".{routing_key}." or obj.get("error") is not None:
        return f"error:{label}", None
    event_id = text_field(obj, "id", MAX_EVENT_ID, reason="event_id")
    path = (path or "").strip("/")
    realm = obj.get("realmId") if isinstance(obj.get("realmId"), str) else None

    def ends(
        user_id: str, reason: str, kind: EventKind = "disconnected", **extra: Any
    ) -> tuple[str, Event | None]:
        return label, Event(
            kind=kind, user_id=user_id, occurred_at=at, event_id=event_id, source=SOURCE,
            reason=reason, **extra,
        )  # fmt: skip

    if resource == "USER_SESSION" and operation == "DELETE":
        sid = _path_id(path, _SESSION_PATH, MAX_SESSION_ID, "session_id")
        if sid is None:
            raise InvalidEvent("invalid_resource_path", f"expected sessions/<id>: {path[:80]}")
        return ends(lookup_user_id(realm), IDP_ADMIN, session_id=sid, lookup="session")
    if resource == "USER" and operation == "ACTION":
        user_id = _path_id(path, _USER_LOGOUT_PATH, MAX_USER_ID, "user_id")
        return ends(user_id, IDP_ADMIN) if user_id else (f"ignored:{label}", None)
    if resource == "USER" and operation in ("DELETE", "UPDATE"):
        user_id = _path_id(path, _USER_PATH, MAX_USER_ID, "user_id")
        if user_id is None:
            return f"ignored:{label}", None  # e.g. users/<id>/role-mappings/...
        if operation == "DELETE":
            return ends(user_id, IDP_USER_DELETED, "blocked")
        rep = representation(obj)
        if rep is not None and rep.get("enabled") is False:
            return ends(user_id, IDP_USER_DISABLED, "blocked")
        if rep is not None and rep.get("enabled") is True:
            # Lifts only a block of Keycloak's own making (``storage.block``).
            return ends(user_id, IDP_USER_DISABLED, "unblocked")
        return f"ignored:{label}", None
    if resource == "REALM" and operation == "ACTION" and path == LOGOUT_ALL_PATH:
        return ends(lookup_user_id(realm), IDP_ADMIN, lookup="realm")
    return f"ignored:{label}", None
