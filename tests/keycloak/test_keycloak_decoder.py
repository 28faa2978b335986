"""The Keycloak plugin's messages as sessiond events (pure code, no servers)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from sessiond.errors import InvalidEvent
from sessiond.keycloak import KeycloakDecoder, bindings, topic_matches

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TIME_MS = 1732521600123
OK_KEY = "KK.EVENT.CLIENT.myrealm.SUCCESS.web.LOGIN"


def message(event_type: str = "LOGIN", **fields: Any) -> dict[str, Any]:
    """The plugin's ``EventClientNotificationMqMsg`` (null fields omitted)."""
    body: dict[str, Any] = {
        "@class": "com.github.aznamier.keycloak.event.provider.EventClientNotificationMqMsg",
        "time": TIME_MS,
        "type": event_type,
        "realmId": "0f5c2d4e-realm",
        "clientId": "web",
        "userId": "8d2f-user",
        "sessionId": "b71e-session",
        "ipAddress": "10.0.0.7",
        "details": {"auth_method": "openid-connect", "username": "john"},
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, indent=2).encode()  # the plugin pretty-prints


def test_login_starts_the_session_at_the_event_time() -> None:
    decoder = KeycloakDecoder()
    event = decoder(encode(message()), NOW, OK_KEY)
    assert event is not None
    assert (event.kind, event.user_id, event.session_id) == (
        "connected",
        "8d2f-user",
        "b71e-session",
    )
    assert event.occurred_at == datetime.fromtimestamp(TIME_MS / 1000, tz=UTC)
    assert (event.name, event.email, event.ip_address) == ("john", None, "10.0.0.7")
    assert event.source == "keycloak"
    assert event.dedup_key().startswith("keycloak:h:")
    assert decoder.counts == {"LOGIN": 1}


def test_logout_ends_the_session() -> None:
    event = KeycloakDecoder()(encode(message("LOGOUT", ipAddress=None, details=None)), NOW, "")
    assert event is not None
    assert (event.kind, event.session_id, event.name, event.ip_address) == (
        "disconnected", "b71e-session", None, None,
    )  # fmt: skip


def test_plugin_id_is_the_dedup_key_in_the_keycloak_namespace() -> None:
    event = KeycloakDecoder()(encode(message(id="ev-1")), NOW, OK_KEY)
    assert event is not None and event.dedup_key() == "keycloak:id:9:8d2f-user:ev-1"


def test_optional_fields_may_be_absent() -> None:
    body = message(ipAddress=None, details=None, time=None)
    event = KeycloakDecoder()(encode(body), NOW, OK_KEY)
    assert event is not None
    assert (event.name, event.ip_address, event.occurred_at) == (None, None, NOW)


def test_email_in_details_is_kept() -> None:
    body = message(details={"username": "john", "email": "john@example.com"})
    event = KeycloakDecoder()(encode(body), NOW, OK_KEY)
    assert event is not None and event.email == "john@example.com"


def test_future_time_is_clamped_to_the_receive_time() -> None:
    event = KeycloakDecoder()(encode(message(time=NOW.timestamp() * 1000 + 60_000)), NOW, OK_KEY)
    assert event is not None and event.occurred_at == NOW


@pytest.mark.parametrize("event_type", ["CODE_TO_TOKEN", "REFRESH_TOKEN", "UPDATE_PROFILE"])
def test_other_types_are_ignored_and_counted(event_type: str) -> None:
    decoder = KeycloakDecoder()
    key = f"KK.EVENT.CLIENT.myrealm.SUCCESS.web.{event_type}"
    assert decoder(encode(message(event_type)), NOW, key) is None
    assert decoder.counts == {f"ignored:{event_type}": 1}


def test_error_results_never_start_a_session() -> None:
    decoder = KeycloakDecoder()
    # The ERROR segment of the routing key...
    assert decoder(encode(message()), NOW, "KK.EVENT.CLIENT.myrealm.ERROR.web.LOGIN") is None
    # ... or an ``error`` field, whatever the routing key says
    assert decoder(encode(message(error="invalid_user_credentials")), NOW, OK_KEY) is None
    # ... even without a user (failed logins of unknown users carry none)
    failed = message("LOGIN_ERROR", userId=None, error="user_not_found")
    assert decoder(encode(failed), NOW, "") is None
    assert decoder.counts == {"error:LOGIN": 2, "error:LOGIN_ERROR": 1}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not_json"),
        (b"[1, 2]", "not_object"),
        (encode({"time": TIME_MS, "userId": "u"}), "unknown_event"),
        (encode(message(userId=None)), "missing_user_id"),
        (encode(message(userId="")), "missing_user_id"),
        (encode(message(userId="x" * 129)), "invalid_user_id"),
        (encode(message(sessionId=None)), "missing_session_id"),
        (encode(message("LOGOUT", sessionId=None)), "missing_session_id"),
        (encode(message(time="yesterday")), "invalid_occurred_at"),
        # Scenario 4 of issue 11: a 400-digit integer overflows a float (OverflowError).
        (
            b'{"type": "LOGIN", "userId": "u", "sessionId": "s", "time": 1' + b"0" * 399 + b"}",
            "invalid_occurred_at",
        ),
        (encode(message(time=-(10**30))), "invalid_occurred_at"),
        (encode(message(ipAddress="x" * 65)), "invalid_ip_address"),
        (encode(message(details=["john"])), "invalid_details"),
        (encode(message(details={"username": {"first": "john"}})), "invalid_name"),
        (encode(message(pad="x" * 70_000)), "too_large"),
    ],
)
def test_invalid_messages_have_a_stable_reason(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        KeycloakDecoder()(body, NOW, OK_KEY)
    assert caught.value.reason == reason


def test_routing_keys_setting_is_comma_separated() -> None:
    assert bindings("KK.EVENT.CLIENT.#") == ["KK.EVENT.CLIENT.#"]
    assert bindings(" KK.EVENT.CLIENT.a.# , KK.EVENT.CLIENT.b.#,") == [
        "KK.EVENT.CLIENT.a.#", "KK.EVENT.CLIENT.b.#",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("binding_key", "routing_key", "matches"),
    [
        ("KK.EVENT.CLIENT.#", OK_KEY, True),
        ("KK.EVENT.CLIENT.myrealm.#", OK_KEY, True),
        ("KK.EVENT.CLIENT.other.#", OK_KEY, False),
        ("KK.EVENT.CLIENT.*.SUCCESS.*.LOGIN", OK_KEY, True),
        ("KK.EVENT.CLIENT.*.SUCCESS.*", OK_KEY, False),  # one word short
        ("#", OK_KEY, True),
        ("#.LOGIN", OK_KEY, True),
        ("KK.#.web.#", OK_KEY, True),
        ("KK.#.mobile.#", OK_KEY, False),
        ("KK.EVENT.#", "KK.EVENT", True),  # '#' matches zero words
        ("KK.EVENT.*", "KK.EVENT", False),  # '*' needs exactly one
        (OK_KEY, OK_KEY, True),
    ],
)
def test_topic_matching_follows_amqp(binding_key: str, routing_key: str, matches: bool) -> None:
    assert topic_matches(binding_key, routing_key) is matches


def test_a_message_from_a_binding_no_longer_configured_is_ignored() -> None:
    # Given sessiond configured for one realm, while the queue still has an older binding
    decoder = KeycloakDecoder(binding_keys=bindings("KK.EVENT.CLIENT.myrealm.#"))
    # When a login of another realm arrives through the leftover binding
    other = decoder(encode(message()), NOW, "KK.EVENT.CLIENT.other.SUCCESS.web.LOGIN")
    # Then it starts nothing and is counted, while the configured realm's login is decoded
    assert other is None and decoder.counts["unbound"] == 1
    assert decoder(encode(message()), NOW, OK_KEY) is not None
