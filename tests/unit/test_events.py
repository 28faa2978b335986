"""The event contract (CONTRACT §1) as pure logic: what is valid, what each invalid kind is called,
and where a user's events go."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta

import pytest

from sessiond.errors import InvalidEvent
from sessiond.events import (
    MAX_DEDUP_KEY,
    MAX_EVENT_ID,
    MAX_USER_ID,
    Event,
    decode_event,
    dedup_key_for,
    partition_of,
    partition_queue,
)
from sessiond.keycloak import KeycloakDecoder

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def decode(obj: object) -> Event:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return decode_event(body, received_at=NOW)


def test_seed_connected_message() -> None:
    ev = decode(
        {"event": "connected", "user_id": "12345", "name": "John Doe", "email": "john@example.com"}
    )
    assert ev == Event(
        kind="connected",
        user_id="12345",
        occurred_at=NOW,
        name="John Doe",
        email="john@example.com",
    )


def test_seed_disconnected_message_and_integer_user_id() -> None:
    ev = decode({"event": "disconnected", "user_id": 12345})
    assert (ev.kind, ev.user_id, ev.session_id, ev.occurred_at) == (
        "disconnected",
        "12345",
        None,
        NOW,
    )


def test_optional_fields_and_unknown_fields_ignored() -> None:
    ev = decode(
        {
            "event": "connected",
            "user_id": "u",
            "session_id": "phone",
            "event_id": "e-1",
            "occurred_at": "2026-05-01T11:00:00+02:00",
            "extra": {"ignored": True},
        }
    )
    assert ev.session_id == "phone"
    assert ev.event_id == "e-1"
    assert ev.occurred_at == datetime(2026, 5, 1, 9, 0, tzinfo=UTC)


def test_epoch_seconds_and_naive_times_are_utc() -> None:
    assert decode({"event": "connected", "user_id": "u", "occurred_at": 0}).occurred_at == (
        datetime(1970, 1, 1, tzinfo=UTC)
    )
    naive = decode({"event": "connected", "user_id": "u", "occurred_at": "2026-05-01T10:00:00"})
    assert naive.occurred_at == datetime(2026, 5, 1, 10, 0, tzinfo=UTC)


def test_future_times_are_clamped_to_receipt() -> None:
    later = (NOW + timedelta(hours=1)).isoformat()
    assert decode({"event": "connected", "user_id": "u", "occurred_at": later}).occurred_at == NOW


def test_empty_session_id_means_the_implicit_session() -> None:
    assert decode({"event": "disconnected", "user_id": "u", "session_id": ""}).session_id is None


def test_name_and_email_only_kept_on_connected() -> None:
    ev = decode({"event": "disconnected", "user_id": "u", "name": "x", "email": "y"})
    assert (ev.name, ev.email) == (None, None)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{nope", "not_json"),
        (b"\xff\xfe", "not_json"),
        (b"[]", "not_object"),
        (b'"connected"', "not_object"),
        ({"user_id": "1"}, "unknown_event"),
        ({"event": "CONNECTED", "user_id": "1"}, "unknown_event"),
        ({"event": "connected"}, "missing_user_id"),
        ({"event": "connected", "user_id": None}, "missing_user_id"),
        ({"event": "connected", "user_id": "  "}, "missing_user_id"),
        ({"event": "connected", "user_id": True}, "invalid_user_id"),
        ({"event": "connected", "user_id": 1.5}, "invalid_user_id"),
        ({"event": "connected", "user_id": "x" * 129}, "invalid_user_id"),
        ({"event": "connected", "user_id": "a\x00b"}, "invalid_user_id"),
        ({"event": "connected", "user_id": "1", "session_id": ["a"]}, "invalid_session_id"),
        ({"event": "connected", "user_id": "1", "name": "n" * 257}, "invalid_name"),
        ({"event": "connected", "user_id": "1", "email": "e" * 321}, "invalid_email"),
        ({"event": "connected", "user_id": "1", "occurred_at": "soon"}, "invalid_occurred_at"),
        ({"event": "connected", "user_id": "1", "occurred_at": True}, "invalid_occurred_at"),
        ({"event": "connected", "user_id": "1", "occurred_at": 1e300}, "invalid_occurred_at"),
        ({"event": "connected", "user_id": "1", "occurred_at": [1]}, "invalid_occurred_at"),
    ],
)
def test_invalid_events_have_stable_reasons(body: object, reason: str) -> None:
    with pytest.raises(InvalidEvent) as err:
        decode(body)
    assert err.value.reason == reason


def test_size_limit_is_checked_before_parsing() -> None:
    body = json.dumps({"event": "connected", "user_id": "1", "pad": "x" * 100}).encode()
    with pytest.raises(InvalidEvent) as err:
        decode_event(body, received_at=NOW, max_bytes=50)
    assert err.value.reason == "too_large"


def test_limits_are_inclusive() -> None:
    ev = decode({"event": "connected", "user_id": "x" * 128, "email": "e" * 320})
    assert len(ev.user_id) == 128


def test_dedup_key_is_scoped_to_source_and_user() -> None:
    # Scenario 6 of issue 11: event_id 7 of user B is not a duplicate of user A's event 7.
    a = decode({"event": "connected", "user_id": "A", "event_id": "7"})
    a_again = decode({"event": "disconnected", "user_id": "A", "event_id": "7"})
    b = decode({"event": "connected", "user_id": "B", "event_id": "7"})
    assert a.dedup_key() == a_again.dedup_key() == "auth:id:1:A:7"
    assert b.dedup_key() != a.dedup_key()
    assert dataclasses.replace(a, source="keycloak").dedup_key() != a.dedup_key()


def test_dedup_key_user_and_id_cannot_be_confused() -> None:
    # "a:b" + "c" and "a" + "b:c" would read alike without the user id's length.
    assert dedup_key_for("auth", "a:b", "c") != dedup_key_for("auth", "a", "b:c")


def test_dedup_key_fits_the_ledger_for_the_longest_ids() -> None:
    long = dedup_key_for("keycloak", "u" * MAX_USER_ID, "e" * MAX_EVENT_ID)
    other_user = dedup_key_for("keycloak", "v" + "u" * (MAX_USER_ID - 1), "e" * MAX_EVENT_ID)
    assert len(long) <= MAX_DEDUP_KEY and len(other_user) <= MAX_DEDUP_KEY
    assert long.startswith("keycloak:idh:") and long != other_user


def test_dedup_key_without_event_id_is_content_hash() -> None:
    a = decode({"event": "connected", "user_id": "u", "occurred_at": 10})
    again = decode({"event": "connected", "user_id": "u", "occurred_at": 10})
    other_time = decode({"event": "connected", "user_id": "u", "occurred_at": 11})
    other_session = decode(
        {"event": "connected", "user_id": "u", "occurred_at": 10, "session_id": "s"}
    )
    assert a.dedup_key() == again.dedup_key()
    assert len({a.dedup_key(), other_time.dedup_key(), other_session.dedup_key()}) == 3


def test_wire_round_trip() -> None:
    ev = decode({"event": "connected", "user_id": "u", "session_id": "s", "name": "N"})
    assert Event.from_wire(json.loads(json.dumps(ev.to_wire()))) == ev


def test_partitioning_is_stable_and_spreads_users() -> None:
    assert partition_of("12345", 8) == partition_of("12345", 8)
    # crc32 is fixed by the algorithm, so this holds across processes and releases
    assert partition_of("12345", 8) == 4
    used = {partition_of(f"user-{i}", 8) for i in range(1000)}
    assert used == set(range(8))
    assert partition_queue(3) == "sessiond.events.p3"


def test_lone_surrogates_are_invalid_in_every_decoder() -> None:
    # JSON allows "\ud800"; UTF-8 (PostgreSQL, Redis, hashing) does not: refused at the door
    with pytest.raises(InvalidEvent) as err:
        decode_event(b'{"event": "connected", "user_id": "\\ud800"}', received_at=NOW)
    assert err.value.reason == "invalid_user_id"
    body = b'{"type": "LOGIN", "userId": "u", "sessionId": "\\udfff", "time": 1}'
    with pytest.raises(InvalidEvent) as err:
        KeycloakDecoder()(body, NOW, "KK.EVENT.CLIENT.r.SUCCESS.web.LOGIN")
    assert err.value.reason == "invalid_session_id"
