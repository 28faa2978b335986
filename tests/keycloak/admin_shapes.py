"""Keycloak admin events exactly as the RabbitMQ plugin publishes them (test fixtures).

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
  strips ``/admin/realms/<realm>/``, ``AdminEventBuilder.representation`` writes a JSON string.
"""

from __future__ import annotations

import json
import time
from typing import Any

ADMIN_CLASS = "com.github.aznamier.keycloak.event.provider.EventAdminNotificationMqMsg"
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
