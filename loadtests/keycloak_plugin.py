"""Keycloak events exactly as its RabbitMQ plugin publishes them: one source for the tests
(``tests/keycloak``) and the revocation bench (``loadtests.bench_revocation``).

Shapes taken from the sources, not invented:
- body: aznamier/keycloak-event-listener-rabbitmq ``EventAdminNotificationMqMsg.create`` copies
  ``authDetails``, ``error``, ``operationType``, ``realmId``, ``representation``,
  ``resourcePath``, ``resourceType``, ``resourceTypeAsString``, ``time`` of Keycloak's
  ``AdminEvent``; ``RabbitMqConfig.writeAsJson(msg, true)`` pretty-prints with Keycloak's
  ``JsonSerialization`` (null fields omitted); ``@class`` from ``@JsonTypeInfo(use = Id.CLASS)``;
  published with ``content_type`` ``application/json``, not persistent;
- routing key: ``RabbitMqConfig.calculateRoutingKey(AdminEvent, ...)`` =
  ``KK.EVENT.ADMIN.<realm name without dots>.<SUCCESS|ERROR>.<resourceTypeAsString>.<operation>``;
- paths and types: keycloak/keycloak ``RealmAdminResource.deleteSession`` (``USER_SESSION``,
  ``DELETE``, ``sessions/<id>``), ``RealmAdminResource.logoutAll`` (``REALM``, ``ACTION``,
  ``logout-all``, representation = ``GlobalRequestResult``), ``UserResource.logout`` (``USER``,
  ``ACTION``, ``users/<id>/logout``), ``UserResource.deleteUser`` (``USER``, ``DELETE``,
  ``users/<id>``), ``UserResource.updateUser`` (``USER``, ``UPDATE``, ``users/<id>``,
  representation = the request's ``UserRepresentation``); ``AdminEventBuilder.resourcePath``
  strips ``/admin/realms/<realm>/``, ``AdminEventBuilder.representation`` writes a JSON string;
- client events: ``EventClientNotificationMqMsg`` (a copy of Keycloak's ``Event``) under
  ``KK.EVENT.CLIENT.<realm>.<SUCCESS|ERROR>.<clientId>.<type>``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pika

from sessiond import amqp
from sessiond.config import Settings

EXCHANGE = "amq.topic"  # the plugin's default (KK_TO_RMQ_EXCHANGE)
ADMIN_CLASS = "com.github.aznamier.keycloak.event.provider.EventAdminNotificationMqMsg"
CLIENT_CLASS = "com.github.aznamier.keycloak.event.provider.EventClientNotificationMqMsg"
CLIENT_TIME_MS = 1_772_366_400_123  # 2026-03-01T12:00:00.123Z
REALM_ID = "5b0f0c64-7a0e-4a57-9a2b-2f1d8c1e0001"
REALM_NAME = "myrealm"
TIME_MS = 1_772_366_460_000  # 2026-03-01T12:01:00Z


def admin_message(
    resource_type: str,
    operation: str,
    path: str,
    *,
    representation: Any = None,
    error: str | None = None,
    time_ms: int | None = None,
) -> dict[str, Any]:
    """``time_ms`` defaults to now: an admin event older than the login it should end is stale."""
    body: dict[str, Any] = {
        "@class": ADMIN_CLASS,
        "time": int(time.time() * 1000) if time_ms is None else time_ms,
        "realmId": REALM_ID,
        "authDetails": {
            "realmId": "c0ffee00-0000-4000-8000-master000001",
            "clientId": "0a1b2c3d-0000-4000-8000-adminconsole",
            "userId": "d00d0000-0000-4000-8000-administrator",
            "ipAddress": "192.168.1.1",
        },
        "resourceType": resource_type,
        "operationType": operation,
        "resourcePath": path,
        "representation": None if representation is None else json.dumps(representation),
        "error": error,
        "resourceTypeAsString": resource_type,
    }
    return {k: v for k, v in body.items() if v is not None}


def routing_key(resource_type: str, operation: str, *, result: str = "SUCCESS") -> str:
    return f"KK.EVENT.ADMIN.{REALM_NAME}.{result}.{resource_type}.{operation}"


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, indent=2).encode()


def session_delete(sid: str) -> tuple[str, dict[str, Any]]:
    return routing_key("USER_SESSION", "DELETE"), admin_message(
        "USER_SESSION", "DELETE", f"sessions/{sid}"
    )


def user_logout(user_id: str) -> tuple[str, dict[str, Any]]:
    return routing_key("USER", "ACTION"), admin_message("USER", "ACTION", f"users/{user_id}/logout")


def user_delete(user_id: str) -> tuple[str, dict[str, Any]]:
    return routing_key("USER", "DELETE"), admin_message("USER", "DELETE", f"users/{user_id}")


def user_update(user_id: str, **rep: Any) -> tuple[str, dict[str, Any]]:
    return routing_key("USER", "UPDATE"), admin_message(
        "USER", "UPDATE", f"users/{user_id}", representation=rep or None
    )


def logout_all() -> tuple[str, dict[str, Any]]:
    result: dict[str, list[str]] = {"successRequests": [], "failedRequests": []}
    return routing_key("REALM", "ACTION"), admin_message(
        "REALM", "ACTION", "logout-all", representation=result
    )


def client_message(event_type: str, user_id: str, session_id: str, **extra: Any) -> dict[str, Any]:
    """A client event of client ``web``; ``extra`` replaces fields (``time`` included)."""
    body: dict[str, Any] = {
        "@class": CLIENT_CLASS,
        "time": CLIENT_TIME_MS,
        "type": event_type,
        "realmId": "0f5c9e1a-7d1c-4f5e-9d43-realm",
        "clientId": "web",
        "userId": user_id,
        "sessionId": session_id,
        "ipAddress": "10.0.0.7",
        "details": {"auth_method": "openid-connect", "username": "john"},
    }
    body.update(extra)
    return body


class Plugin:
    """Publishes as the plugin does: ``amq.topic``, pretty JSON, transient, no confirms."""

    def __init__(self, settings: Settings) -> None:
        self.conn = pika.BlockingConnection(amqp.connection_parameters(settings))
        self.ch = self.conn.channel()

    def publish(self, key: str, body: dict[str, Any] | bytes) -> None:
        data = encode(body) if isinstance(body, dict) else body
        props = pika.BasicProperties(content_type="application/json", content_encoding="UTF-8")
        self.ch.basic_publish(EXCHANGE, key, data, props)

    def admin(self, pair: tuple[str, dict[str, Any]]) -> None:
        self.publish(*pair)

    def client(
        self, event_type: str, user: str, sid: str, *, ago_s: float = 5, **extra: Any
    ) -> None:
        """A client event ``ago_s`` seconds old (recent: the idle timeout must not bite)."""
        key = f"KK.EVENT.CLIENT.{REALM_NAME}.SUCCESS.web.{event_type}"
        body = client_message(event_type, user, sid, **extra)
        body["time"] = int((time.time() - ago_s) * 1000)
        self.publish(key, body)

    def close(self) -> None:
        if self.conn.is_open:
            self.conn.close()
