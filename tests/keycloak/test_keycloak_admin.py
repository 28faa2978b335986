"""Keycloak admin events and revocation client events as sessiond events (pure code)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadtests import keycloak_plugin as kc
from sessiond.errors import InvalidEvent
from sessiond.events import Event
from sessiond.keycloak import KeycloakDecoder, bindings
from sessiond.keycloak_admin import lookup_user_id
from tests.keycloak.test_keycloak_decoder import encode as encode_client
from tests.keycloak.test_keycloak_decoder import message as client_message

NOW = datetime(2026, 3, 1, 13, 0, tzinfo=UTC)
AT = datetime.fromtimestamp(kc.TIME_MS / 1000, tz=UTC)
DEFAULT_KEYS = bindings("KK.EVENT.CLIENT.#,KK.EVENT.ADMIN.#")


def decode(pair: tuple[str, dict[str, Any]], decoder: KeycloakDecoder | None = None) -> Any:
    key, body = pair
    body["time"] = kc.TIME_MS
    return (decoder or KeycloakDecoder(binding_keys=DEFAULT_KEYS))(kc.encode(body), NOW, key)


def test_session_delete_ends_that_session_of_its_owner_looked_up() -> None:
    decoder = KeycloakDecoder(binding_keys=DEFAULT_KEYS)
    event = decode(kc.session_delete("b71e-session"), decoder)
    assert isinstance(event, Event)
    assert (event.kind, event.session_id, event.lookup, event.reason) == (
        "disconnected", "b71e-session", "session", "idp_admin",
    )  # fmt: skip
    assert event.user_id == lookup_user_id(kc.REALM_ID)
    assert event.occurred_at == AT and event.source == "keycloak"
    assert decoder.counts == {"ADMIN.USER_SESSION.DELETE": 1}


def test_user_logout_action_ends_every_session_of_the_user() -> None:
    event = decode(kc.user_logout("8d2f-user"))
    assert (event.kind, event.user_id, event.session_id, event.lookup, event.reason) == (
        "disconnected", "8d2f-user", None, None, "idp_admin",
    )  # fmt: skip


def test_user_delete_and_disable_block_the_user_with_their_reason() -> None:
    deleted = decode(kc.user_delete("8d2f-user"))
    disabled = decode(kc.user_update("8d2f-user", username="john", enabled=False))
    assert (deleted.kind, deleted.user_id, deleted.session_id, deleted.reason) == (
        "blocked", "8d2f-user", None, "idp_user_deleted",
    )  # fmt: skip
    assert (disabled.kind, disabled.user_id, disabled.session_id, disabled.reason) == (
        "blocked", "8d2f-user", None, "idp_user_disabled",
    )  # fmt: skip
    assert deleted.dedup_key() != disabled.dedup_key()


def test_user_enabled_again_lifts_only_keycloaks_own_block() -> None:
    enabled = decode(kc.user_update("8d2f-user", username="john", enabled=True))
    assert (enabled.kind, enabled.user_id, enabled.reason) == (
        "unblocked", "8d2f-user", "idp_user_disabled",
    )  # fmt: skip


@pytest.mark.parametrize("rep", [None, {"firstName": "John"}, {"enabled": "false"}])
def test_user_update_without_an_explicit_disable_changes_nothing(rep: Any) -> None:
    decoder = KeycloakDecoder(binding_keys=DEFAULT_KEYS)
    assert decode(kc.user_update("8d2f-user", **(rep or {})), decoder) is None
    assert decoder.counts == {"ignored:ADMIN.USER.UPDATE": 1}


def test_the_representation_is_a_json_string_in_the_plugins_message() -> None:
    _, body = kc.user_update("u1", enabled=False)
    assert isinstance(body["representation"], str)
    as_object = {**body, "representation": json.loads(body["representation"])}
    event = KeycloakDecoder()(kc.encode(as_object), NOW, kc.routing_key("USER", "UPDATE"))
    assert event is not None and (event.kind, event.reason) == ("blocked", "idp_user_disabled")


def test_logout_all_logs_out_every_connected_user_by_lookup() -> None:
    event = decode(kc.logout_all())
    assert (event.kind, event.lookup, event.session_id, event.reason) == (
        "disconnected", "realm", None, "idp_admin",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("resource", "operation", "path"),
    [
        ("USER", "CREATE", "users/8d2f-user"),
        ("USER", "ACTION", "users/8d2f-user/reset-password"),
        ("USER", "DELETE", "users/8d2f-user/federated-identity/google"),
        ("REALM", "ACTION", "push-revocation"),
        ("REALM", "UPDATE", ""),
        ("CLIENT", "DELETE", "clients/4f0e"),
        ("USER_SESSION", "ACTION", "sessions/b71e"),
    ],
)
def test_other_admin_events_change_nothing(resource: str, operation: str, path: str) -> None:
    decoder = KeycloakDecoder(binding_keys=DEFAULT_KEYS)
    pair = (kc.routing_key(resource, operation), kc.admin_message(resource, operation, path))
    assert decode(pair, decoder) is None
    assert decoder.counts == {f"ignored:ADMIN.{resource}.{operation}": 1}


def test_a_failed_admin_operation_changes_nothing() -> None:
    decoder = KeycloakDecoder(binding_keys=DEFAULT_KEYS)
    key = kc.routing_key("USER", "ACTION", result="ERROR")
    body = kc.admin_message("USER", "ACTION", "users/u1/logout", error="unknown_error")
    assert decoder(kc.encode(body), NOW, key) is None
    assert decoder.counts == {"error:ADMIN.USER.ACTION": 1}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"operationType": None}, "invalid_operation_type"),
        ({"operationType": "EXPLODE"}, "invalid_operation_type"),
        ({"operationType": 3}, "invalid_operation_type"),
        ({"resourceType": None, "resourceTypeAsString": None}, "invalid_resource_type"),
        ({"resourcePath": 12}, "invalid_resource_path"),
        ({"resourcePath": "sessions/"}, "invalid_resource_path"),
        ({"resourcePath": "sessions/a/b"}, "invalid_resource_path"),
        ({"time": "yesterday"}, "invalid_occurred_at"),
    ],
)
def test_malformed_session_deletes_are_refused_with_a_reason(
    change: dict[str, Any], reason: str
) -> None:
    key, body = kc.session_delete("b71e")
    body = {k: v for k, v in {**body, **change}.items() if v is not None}
    with pytest.raises(InvalidEvent) as info:
        KeycloakDecoder()(kc.encode(body), NOW, key)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("rep", "reason"),
    [("{not json", "invalid_representation"), ("[1, 2]", "invalid_representation"),
     (7, "invalid_representation")],
)  # fmt: skip
def test_a_malformed_representation_is_refused(rep: Any, reason: str) -> None:
    key, body = kc.user_update("u1")
    with pytest.raises(InvalidEvent) as info:
        KeycloakDecoder()(kc.encode({**body, "representation": rep}), NOW, key)
    assert info.value.reason == reason


def test_a_user_id_too_long_in_the_path_is_refused() -> None:
    with pytest.raises(InvalidEvent) as info:
        decode(kc.user_logout("x" * 200))
    assert info.value.reason == "invalid_user_id"


def test_an_admin_body_without_its_routing_key_is_recognised_by_class() -> None:
    _, body = kc.user_logout("u1")
    event = KeycloakDecoder()(kc.encode(body), NOW, "replay")
    assert event is not None and event.reason == "idp_admin"


def test_user_session_deleted_client_event_ends_that_session_as_expired() -> None:
    body = client_message("USER_SESSION_DELETED", ipAddress=None, details=None)
    key = "KK.EVENT.CLIENT.myrealm.SUCCESS.web.USER_SESSION_DELETED"
    event = KeycloakDecoder(binding_keys=DEFAULT_KEYS)(encode_client(body), NOW, key)
    assert event is not None
    assert (event.kind, event.user_id, event.session_id, event.reason) == (
        "disconnected", "8d2f-user", "b71e-session", "idp_expired",
    )  # fmt: skip


@pytest.mark.parametrize("event_type", ["REFRESH_TOKEN", "CODE_TO_TOKEN"])
def test_token_events_are_activity_only_when_configured(event_type: str) -> None:
    body = encode_client(client_message(event_type))
    key = f"KK.EVENT.CLIENT.myrealm.SUCCESS.web.{event_type}"
    assert KeycloakDecoder()(body, NOW, key) is None
    event = KeycloakDecoder(activity_types=[event_type])(body, NOW, key)
    assert event is not None
    assert (event.kind, event.user_id, event.session_id) == (
        "activity", "8d2f-user", "b71e-session",
    )  # fmt: skip


def test_wire_form_omits_the_new_fields_when_unset_and_round_trips_them() -> None:
    plain = Event(kind="connected", user_id="u", occurred_at=AT)
    assert "reason" not in plain.to_wire() and "lookup" not in plain.to_wire()
    revoke = decode(kc.session_delete("s1"))
    assert Event.from_wire(json.loads(json.dumps(revoke.to_wire()))) == revoke


@given(
    resource=st.sampled_from(["USER", "USER_SESSION", "REALM", "CLIENT", "GROUP"]),
    operation=st.sampled_from(["CREATE", "UPDATE", "DELETE", "ACTION"]),
    path=st.text(max_size=80),
    rep=st.one_of(
        st.none(), st.text(max_size=40), st.dictionaries(st.text(max_size=5), st.booleans())
    ),
)
def test_any_admin_body_decodes_or_is_refused_with_a_reason(
    resource: str, operation: str, path: str, rep: Any
) -> None:
    body = kc.admin_message(resource, operation, path)
    if rep is not None:
        body["representation"] = rep
    try:
        event = KeycloakDecoder()(kc.encode(body), NOW, kc.routing_key(resource, operation))
    except InvalidEvent as exc:
        assert exc.reason.startswith("invalid_")
        return
    if event is not None:
        assert event.kind in ("disconnected", "blocked", "unblocked") and event.reason is not None
        assert event.lookup is not None or event.user_id in path
