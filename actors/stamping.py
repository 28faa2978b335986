"""The times the ingress gives a message: its receipt stamp, or the stamps it was first given.

Two kinds of message come back with a time of their own to keep. A replayed dead letter carries
its original stamps in headers (``actors.deadletter.restored_stamps``). A copy of an event (the
publisher re-published it, same ``event_id``) carries nothing, so the first receipt's stamps are
kept in PostgreSQL by the event's de-duplication key (``storage.receipts``) and given back to
every later copy: without that, a copy that overtakes its original (held in retries) would be
stamped after the events published in between and applied first, and the outcome would depend
on processing timing. Only events whose time *is* the stamp need it; an event with its own
``occurred_at`` keeps that time whatever copy comes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Final, TypeVar

from actors import deadletter
from actors.forwarding import Stamps
from sessiond.errors import SessiondError
from sessiond.events import Event
from sessiond.stamps import Clock, publisher_stamp, timestamp_of
from storage import receipts
from storage.db import DB_CONNECTION_ERRORS, DB_WRAPPED_ERROR
from storage.receipts import Receipt

T = TypeVar("T")
Remember = Callable[[list[Receipt]], dict[str, Receipt]]
"""Stores a batch's first receipts and returns the stored one of every key (blocking)."""

RECEIPTS_TIMEOUT_S: Final = 5.0
"""How long a batch waits for PostgreSQL: past it the batch fails, is rolled back and read again
(nothing forwarded with a fresh stamp in place of a first receipt), and the ingress is not held
longer than the broker's patience with a silent connection."""


class ReceiptsUnavailable(SessiondError):
    """PostgreSQL did not store a batch's first receipts in time: the batch is read again."""


class Stamper:
    """One consumer's receipt stamps (kept across reconnections: they never go backwards)."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self._last_stamp: datetime | None = None

    def stamps(self, headers: dict[str, Any] | None, timestamp: object) -> Stamps:
        """A replay's restored stamps (never later than now), else the receipt, with the
        publisher's AMQP ``timestamp`` as the event's time when it set one."""
        receipt = self.clock.next()
        restored = deadletter.restored_stamps(headers)
        if restored is not None:
            received = min(restored[0], receipt)
            return Stamps(received, min(restored[1], received))
        ts = timestamp_of(timestamp)
        stamp = receipt
        if ts is not None:
            stamp = publisher_stamp(ts, after=self._last_stamp, receipt=receipt)
        self._last_stamp = stamp
        return Stamps(receipt, stamp)


def stamp_keyed(event: Event, stamps: Stamps) -> bool:
    """The event's time is the stamp (no ``occurred_at``, or a future one clamped to the receipt)
    and a copy would say so by its ``event_id``."""
    return event.event_id is not None and event.occurred_at == stamps.received_at


def first_receipts(
    decoded: list[tuple[Event, Stamps]], remember: Remember
) -> list[tuple[Event, Stamps]]:
    """Each event with the stamps of its first receipt: its own for a first copy, the stored ones
    for a later copy (in an earlier batch, or earlier in this one). One call to ``remember`` for
    the batch, none when no event needs it."""
    wanted = [
        Receipt(event.dedup_key(), stamps.received_at, stamps.stamped_at)
        for event, stamps in decoded
        if stamp_keyed(event, stamps)
    ]
    if not wanted:
        return decoded
    stored = remember(wanted)
    out: list[tuple[Event, Stamps]] = []
    for event, stamps in decoded:
        first = stored.get(event.dedup_key()) if stamp_keyed(event, stamps) else None
        if first is not None and first.received_at < stamps.received_at:
            stamps = Stamps(first.received_at, min(first.stamped_at, first.received_at))
            event = dataclasses.replace(event, occurred_at=first.received_at)
        out.append((event, stamps))
    return out


def on_loop(run: Callable[[Awaitable[dict[str, Receipt]]], dict[str, Receipt]]) -> Remember:
    """``storage.receipts.remember`` run on an event loop where the database is open (the
    worker's: ``actors.runtime.Runtime.run``), bounded by ``RECEIPTS_TIMEOUT_S``."""

    def remember(batch: list[Receipt]) -> dict[str, Receipt]:
        try:
            return run(asyncio.wait_for(receipts.remember(batch), RECEIPTS_TIMEOUT_S))
        except (TimeoutError, OSError, DB_WRAPPED_ERROR, *DB_CONNECTION_ERRORS) as exc:
            raise ReceiptsUnavailable(repr(exc)) from exc

    return remember
