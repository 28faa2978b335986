"""First receipts: the stamps an event without a time of its own was first given, by its key.

Such an event's time is the ingress stamp, so a copy of it (a publisher re-publishing after a
lost confirm) stamped at its own receipt would be a different, later event: applied first while
the original waits in retries, it is ordered after events published in between, and the original
is then dropped as its duplicate. Remembering the first receipt by the de-duplication key (the
publisher's ``event_id``) gives every copy the original's stamps, as a replayed dead letter gets
back its own (``actors.deadletter.restored_stamps``): which copy is applied first no longer
matters. Rows are kept as long as the de-duplication ledger (``storage.retention``).

A row is written before the batch it belongs to is acted upon (forwarded), so the batch can fail
after it: such a row is no first receipt, as nothing was given its stamps. The caller says, per
key, which stored stamps count (``Settled``); a row that does not is overwritten by the attempt
now being stored. Which stamps those are is the caller's knowledge (``actors.stamping``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from storage.db import conn


@dataclass(frozen=True, slots=True)
class Receipt:
    """The stamps one key was (or is now being) first given."""

    key: str
    received_at: datetime
    stamped_at: datetime


@dataclass(frozen=True, slots=True)
class Settled:
    """Which stored receipts count: those received at or before ``upto`` (``None``: none is
    known to), except those after ``void[0]`` and at or before ``void[1]`` (given by attempts
    known to have failed). A stored receipt that does not count was written for a batch that
    was never acted upon, so it is replaced by the receipt being stored now."""

    upto: datetime | None = None
    void: tuple[datetime, datetime] | None = None


# A row counts (is kept) when the caller says its stamp was acted upon; otherwise (NULL ``upto``
# included: ``x <= NULL`` is not true) this attempt's stamps replace it. ``RETURNING`` gives the
# stored row either way. In ``SET`` every ``event_receipts.*`` is the row as it was.
_REMEMBER: Final = """
WITH input AS (
    SELECT * FROM unnest(
        $1::text[], $2::timestamptz[], $3::timestamptz[],
        $4::timestamptz[], $5::timestamptz[], $6::timestamptz[]
    ) AS i(key, received_at, stamped_at, upto, void_after, void_upto)
)
INSERT INTO event_receipts (key, received_at, stamped_at)
SELECT key, received_at, stamped_at FROM input
ON CONFLICT (key) DO UPDATE SET (received_at, stamped_at) = (
    SELECT
        CASE WHEN c.counts THEN event_receipts.received_at ELSE excluded.received_at END,
        CASE WHEN c.counts THEN event_receipts.stamped_at ELSE excluded.stamped_at END
    FROM (
        SELECT coalesce(
            event_receipts.received_at <= i.upto
            AND (i.void_after IS NULL
                 OR event_receipts.received_at <= i.void_after
                 OR event_receipts.received_at > i.void_upto),
            false
        ) AS counts
        FROM input AS i WHERE i.key = excluded.key
    ) AS c
)
RETURNING key, received_at, stamped_at
"""


def first_of_each(receipts: list[Receipt]) -> list[Receipt]:
    """One receipt per key, the earliest in the batch: one statement may not touch a row twice
    (``ON CONFLICT DO UPDATE``), and a copy later in the batch is a copy of the first."""
    seen: dict[str, Receipt] = {}
    for r in receipts:
        seen.setdefault(r.key, r)
    return list(seen.values())


async def remember(
    receipts: list[Receipt], settled: Callable[[str], Settled]
) -> dict[str, Receipt]:
    """Stores the batch's receipts whose key has none that counts (``settled(key)``), in one
    statement, and returns the stored receipt of every key: the one just written, or the
    counting one a previous copy left."""
    firsts = first_of_each(receipts)
    if not firsts:
        return {}
    bounds = [settled(r.key) for r in firsts]
    rows = await conn().execute_query_dict(
        _REMEMBER,
        [
            [r.key for r in firsts],
            [r.received_at for r in firsts],
            [r.stamped_at for r in firsts],
            [b.upto for b in bounds],
            [None if b.void is None else b.void[0] for b in bounds],
            [None if b.void is None else b.void[1] for b in bounds],
        ],
    )
    return {row["key"]: Receipt(row["key"], row["received_at"], row["stamped_at"]) for row in rows}
