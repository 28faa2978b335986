"""Ingress stamps (``sessiond.stamps``): they follow queue order, never go backwards, and a
publisher's whole-second timestamp keeps queue order within its second."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from sessiond.stamps import TICK, Clock, parse_stamp, publisher_stamp, timestamp_of

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def test_stamps_increase_even_when_the_wall_clock_stands_still_or_steps_back() -> None:
    # Given a wall clock that repeats itself, then jumps back 5 s (an NTP step)
    readings = iter([T0, T0, T0 - timedelta(seconds=5), T0 + timedelta(seconds=1)])
    clock = Clock(now=lambda: next(readings))
    # When four messages are stamped
    stamps = [clock.next() for _ in range(4)]
    # Then each is later than the one before, by a microsecond where the clock did not move
    assert stamps == [T0, T0 + TICK, T0 + 2 * TICK, T0 + timedelta(seconds=1)]


@given(
    st.lists(st.integers(min_value=-(10**9), max_value=10**9), min_size=1, max_size=50),
    st.integers(min_value=-(10**9), max_value=10**9),
)
def test_never_backwards_across_a_hand_over(offsets_us: list[int], skew_us: int) -> None:
    # Given consumer A stamping with its clock, then B (clock skewed by any amount) taking over
    # from A's high-water stamp
    a = Clock(now=iter([T0 + timedelta(microseconds=o) for o in offsets_us]).__next__)
    a_stamps = [a.next() for _ in offsets_us]
    assert a.last is not None
    b = Clock(now=lambda: T0 + timedelta(microseconds=skew_us))
    b.advance_to(a.last)
    # Then B's first stamp is after every stamp A gave
    first = b.next()
    assert all(first > s for s in a_stamps)
    assert all(x < y for x, y in itertools.pairwise(a_stamps))


def test_publisher_timestamp_keeps_queue_order_within_its_second() -> None:
    ts = int(T0.timestamp())
    receipt = T0 + timedelta(seconds=3)
    login = publisher_stamp(ts, after=None, receipt=receipt)
    logout = publisher_stamp(ts, after=login, receipt=receipt)
    assert login == T0 and logout == T0 + TICK
    # a previous event of an earlier second does not pull it before its own second
    assert publisher_stamp(ts, after=T0 - timedelta(seconds=9), receipt=receipt) == T0
    # a previous event of a later second cannot push it out of its own second
    late = publisher_stamp(ts, after=T0 + timedelta(seconds=2), receipt=receipt)
    assert late == T0 + timedelta(seconds=1) - TICK
    # a publisher clock ahead of ours is clamped to the receipt
    assert publisher_stamp(ts + 60, after=None, receipt=receipt) == receipt


def test_unusable_timestamps_and_stamps_are_ignored() -> None:
    assert timestamp_of(None) is None and timestamp_of(True) is None
    assert timestamp_of(10**400) is None and timestamp_of(-1) is None
    assert timestamp_of(1_764_590_400) == 1_764_590_400
    assert parse_stamp(b"2026-12-01T12:00:00.000001+00:00") == T0 + TICK
    assert parse_stamp("2026-12-01T12:00:00") is None  # no offset: not ours
    assert parse_stamp("yesterday") is None and parse_stamp(7) is None
