"""Property tests of the event decoder (CONTRACT §1): whatever bytes arrive, ``decode_event``
returns a valid ``Event`` or raises ``InvalidEvent`` with a documented reason, never anything else;
and what it returns can be stored, keyed and partitioned (UTF-8 text, no NUL, bounded)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sessiond.errors import InvalidEvent
from sessiond.events import (
    MAX_EMAIL,
    MAX_EVENT_ID,
    MAX_NAME,
    MAX_SESSION_ID,
    MAX_USER_ID,
    Event,
    decode_event,
    partition_of,
)

RECEIVED = datetime(2026, 6, 1, tzinfo=UTC)
REASONS = {
    "too_large", "not_json", "not_object", "unknown_event", "missing_user_id", "invalid_user_id",
    "invalid_session_id", "invalid_event_id", "invalid_name", "invalid_email",
    "invalid_occurred_at",
}  # fmt: skip
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=300)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
times = (
    st.none()
    | st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat())
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.text(max_size=40)
)
events = st.fixed_dictionaries(
    {"event": st.sampled_from(["connected", "disconnected"]) | json_values},
    optional={
        "user_id": st.text(min_size=0, max_size=140) | json_values,
        "session_id": st.text(max_size=140) | json_values,
        "event_id": st.text(max_size=210) | json_values,
        "name": st.text(max_size=270) | json_values,
        "email": st.text(max_size=330) | json_values,
        "occurred_at": times | json_values,
        "extra": json_values,
    },
)


def check(body: bytes) -> Event | None:
    try:
        event = decode_event(body, received_at=RECEIVED)
    except InvalidEvent as exc:
        assert exc.reason in REASONS, exc.reason
        return None
    # A returned event is usable by everything downstream.
    for text, limit in (
        (event.user_id, MAX_USER_ID), (event.session_id, MAX_SESSION_ID),
        (event.event_id, MAX_EVENT_ID), (event.name, MAX_NAME), (event.email, MAX_EMAIL),
    ):  # fmt: skip
        if text is not None:
            assert len(text) <= limit and "\x00" not in text
            text.encode("utf-8")  # PostgreSQL, Redis and the AMQP wire all need UTF-8
    assert event.user_id.strip()
    assert event.occurred_at.tzinfo is not None and event.occurred_at <= RECEIVED
    event.dedup_key()
    assert 0 <= partition_of(event.user_id, 8) < 8
    assert Event.from_wire(json.loads(json.dumps(event.to_wire()))) == event
    return event


@SETTINGS
@given(st.binary(max_size=2048))
def test_any_bytes_decode_or_invalid(body: bytes) -> None:
    check(body)


@SETTINGS
@given(events)
@example({"event": "connected", "user_id": "\ud800"})  # a lone surrogate: JSON allows "\ud800"
@example({"event": "connected", "user_id": "1", "session_id": "\udfff"})
@example({"event": "connected", "user_id": "1", "occurred_at": 1e300})
@example({"event": "connected", "user_id": "1", "occurred_at": "9999-12-31T23:59:59-23:59"})
@example({"event": "disconnected", "user_id": 10**40})
def test_any_object_decodes_or_is_invalid(obj: dict[str, Any]) -> None:
    body = json.dumps(obj).encode()
    check(body)


@SETTINGS
@given(st.text(max_size=500))
def test_any_text_decodes_or_is_invalid(text: str) -> None:
    check(text.encode("utf-8", "surrogatepass"))


def test_deep_nesting_is_invalid_not_a_crash() -> None:
    body = b'{"event": "connected", "user_id": "1", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    check(body[:60_000])  # under the size limit, not valid JSON: refused cleanly
    deep = b"[" * 30_000 + b"]" * 30_000
    check(deep)
