"""Ingress stamps: the time an event without ``occurred_at`` is given, in pure code.

An event that carries no time of its own is ordered by the time sessiond gives it, so those
times must follow queue order. The ingest queues have a single active consumer, and that
consumer's stamps never go backwards:

- ``Clock.next`` is the consumer's receipt clock: the wall clock, but always at least one
  microsecond after the previous stamp (two events read in the same microsecond, or a wall clock
  stepped back by NTP, still get increasing stamps);
- ``Clock.advance_to`` lifts it above the high-water stamp the previous active consumer left
  (persisted in RabbitMQ, ``actors.topology``), so that a hand-over to a worker whose clock is
  behind never stamps a logout earlier than the login the other worker stamped;
- ``publisher_stamp`` uses the AMQP ``timestamp`` property when the publisher set one: its time
  is better than ours after a backlog, but it has whole seconds only, so within its second the
  queue order decides.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

TICK = timedelta(microseconds=1)
SECOND = timedelta(seconds=1)


def utc_now() -> datetime:
    return datetime.now(UTC)


class Clock:
    """One consumer's receipt stamps: strictly increasing, never before the high-water stamp."""

    def __init__(self, now: Callable[[], datetime] = utc_now) -> None:
        self._now = now
        self.last: datetime | None = None

    def advance_to(self, floor: datetime) -> None:
        """Never stamp at or before ``floor`` (the previous active consumer's last stamp)."""
        if self.last is None or floor > self.last:
            self.last = floor

    def mark(self) -> datetime:
        """A time every later stamp is after: now by this clock, or the last stamp if later."""
        now = self._now()
        if self.last is None or now > self.last:
            self.last = now
        return self.last

    def next(self) -> datetime:
        stamp = self._now()
        if self.last is not None and stamp <= self.last:
            stamp = self.last + TICK
        self.last = stamp
        return stamp


def publisher_stamp(timestamp: int, *, after: datetime | None, receipt: datetime) -> datetime:
    """The AMQP ``timestamp`` (epoch seconds) as an event time.

    Within its second it is placed just after ``after`` (the previous event's time), so that two
    events of one second keep their queue order instead of tying; never later than ``receipt``
    (a publisher clock ahead of ours is clamped, as ``occurred_at`` is).
    """
    base = datetime.fromtimestamp(timestamp, tz=UTC)
    top = base + SECOND - TICK
    stamp = base if after is None else max(base, min(after + TICK, top))
    return min(stamp, receipt)


def timestamp_of(value: object) -> int | None:
    """The AMQP ``timestamp`` property when it is usable: an integer within datetime's range."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if not 0 < value < 253_402_300_799:  # 9999-12-31T23:59:59Z
        return None
    return value


def parse_stamp(value: object) -> datetime | None:
    """A stamp carried in a header or a high-water message (ISO 8601 with offset), or ``None``."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return when.astimezone(UTC)
