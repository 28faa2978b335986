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
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from actors import deadletter
from actors.forwarding import Stamps
from sessiond.errors import SessiondError
from sessiond.events import Event
from sessiond.stamps import Clock, publisher_stamp, timestamp_of
from storage import receipts
from storage.db import DB_CONNECTION_ERRORS, DB_WRAPPED_ERROR
from storage.receipts import Receipt, Settled

T = TypeVar("T")
Remember = Callable[[list[Receipt], Callable[[str], Settled]], dict[str, Receipt]]
"""Stores a batch's first receipts, replacing the stored ones that do not count (by key), and
returns the stored one of every key (blocking)."""

NEVER: Final = datetime.min.replace(tzinfo=UTC)

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
            return given_back(min(restored[0], receipt), restored[1])
        ts = timestamp_of(timestamp)
        stamp = receipt
        if ts is not None:
            stamp = publisher_stamp(ts, after=self._last_stamp, receipt=receipt)
        self._last_stamp = stamp
        return Stamps(receipt, stamp)


class Settlement:
    """Which stored first receipts count, per source: those of batches its consumers committed.

    The receipts are stored before the batch's AMQP commit, and the commit can fail: its batch is
    then read again and its events without an ``event_id`` get new stamps, so a keyed one given
    back the failed attempt's would be reordered among them. The high-water stamp is committed
    with the batch (``actors.topology``), so every receipt of a committed batch is at or below
    a committed high-water, known here after each commit or read back from RabbitMQ when a
    consumer (this one again, or another after a hand-over) starts on the queue. That read also
    settles a commit that failed on our side but was done by the broker: its high-water came
    back, so its receipts count. A failed attempt's receipts are above the high-water read
    after it; yet this connection's commits then pass them, while its batches may cut the
    redelivery otherwise than the failed attempt did. So the stamps between that read and
    ``Clock.mark`` (below every stamp this connection gives) count never: ``Settled.void``.
    """

    def __init__(self) -> None:
        self._upto: dict[str, datetime] = {}
        self._void: dict[str, tuple[datetime, datetime]] = {}

    def started(self, source: str, high_water: datetime | None, mark: datetime) -> None:
        """A connection's first batch of ``source``: the high-water read from RabbitMQ, and a
        time every stamp the connection gives will be after."""
        known = self._upto.get(source)
        if high_water is not None and (known is None or high_water > known):
            known = self._upto[source] = high_water
        after = NEVER if known is None else known
        if mark > after:
            self._void[source] = (after, mark)
        else:
            self._void.pop(source, None)

    def committed(self, sources: list[str], high_water: datetime) -> None:
        """The batch's publishes and this high-water were committed together."""
        for source in sources:
            known = self._upto.get(source)
            if known is None or high_water > known:
                self._upto[source] = high_water

    def of(self, source: str) -> Settled:
        return Settled(self._upto.get(source), self._void.get(source))


def given_back(received: datetime, stamped: datetime) -> Stamps:
    """Stamps an event gets back (a replayed dead letter's, a copy's first receipt): the one
    rule for both, never stamped after the receipt."""
    return Stamps(received, min(stamped, received))


def stamp_keyed(event: Event, stamps: Stamps) -> bool:
    """The event's time is the stamp (no ``occurred_at``, or a future one clamped to the receipt)
    and a copy would say so by its ``event_id``."""
    return event.event_id is not None and event.occurred_at == stamps.received_at


def first_receipts(
    decoded: list[tuple[str, Event, Stamps]], remember: Remember, settlement: Settlement
) -> list[tuple[Event, Stamps]]:
    """Each event (with the name of its source) with the stamps of its first receipt: its own for
    a first copy, the stored ones for a later copy (in a committed batch, or earlier in this
    one). One call to ``remember`` for the batch, none when no event needs it."""
    keys = [
        event.dedup_key() if stamp_keyed(event, stamps) else None for _s, event, stamps in decoded
    ]
    wanted: list[Receipt] = []
    settled: dict[str, Settled] = {}
    for (source, _event, stamps), key in zip(decoded, keys, strict=True):
        if key is not None:
            wanted.append(Receipt(key, stamps.received_at, stamps.stamped_at))
            settled[key] = settlement.of(source)
    if not wanted:
        return [(event, stamps) for _source, event, stamps in decoded]
    stored = remember(wanted, settled.__getitem__)
    out: list[tuple[Event, Stamps]] = []
    for (_source, event, stamps), key in zip(decoded, keys, strict=True):
        first = stored.get(key) if key is not None else None
        if first is not None and first.received_at < stamps.received_at:
            stamps = given_back(first.received_at, first.stamped_at)
            event = dataclasses.replace(event, occurred_at=first.received_at)
        out.append((event, stamps))
    return out


def on_loop(run: Callable[[Awaitable[dict[str, Receipt]]], dict[str, Receipt]]) -> Remember:
    """``storage.receipts.remember`` run on an event loop where the database is open (the
    worker's: ``actors.runtime.Runtime.run``), bounded by ``RECEIPTS_TIMEOUT_S``."""

    def remember(batch: list[Receipt], settled: Callable[[str], Settled]) -> dict[str, Receipt]:
        try:
            return run(asyncio.wait_for(receipts.remember(batch, settled), RECEIPTS_TIMEOUT_S))
        except (TimeoutError, OSError, DB_WRAPPED_ERROR, *DB_CONNECTION_ERRORS) as exc:
            raise ReceiptsUnavailable(repr(exc)) from exc

    return remember
