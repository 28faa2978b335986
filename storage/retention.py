"""Tables that grow with traffic are kept for a bounded time, not forever.

``processed_events`` gains one row per event: at a thousand events a second, 86 million a day.
A redelivery comes back within the retry budget (an hour) or with a dead-letter replay, so the
ledger only has to remember a few days (``SESSIOND_DEDUP_RETENTION_S``, 7 by default). Past that,
the data still makes a redelivered event a no-op: each session keeps the time of its newest event
and each user the time of their last full logout, so the old event is refused as ``stale``
instead of ``duplicate``, and changes nothing.

``audit_events`` gains a row per access decision as well as per lifecycle change. How long an
audit trail must be kept is the operator's decision: ``SESSIOND_AUDIT_RETENTION_S`` is off
(keep everything) unless set.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from storage.db import conn

BATCH: Final = 10_000

# table -> (its key, its time column); both time columns are indexed.
_TABLES: Final = {"processed_events": ("key", "processed_at"), "audit_events": ("id", "at")}


async def purge(table: str, *, before: datetime, max_rows: int = 200_000) -> int:
    """Deletes ``table``'s rows older than ``before`` in short transactions of ``BATCH`` rows (a
    range scan on the time index), at most ``max_rows`` a call: a backlog is worked off over
    several sweeps instead of in one long delete. Returns how many went."""
    key, at = _TABLES[table]
    statement = (
        f"DELETE FROM {table} WHERE {key} IN"  # names from _TABLES only, never input
        f" (SELECT {key} FROM {table} WHERE {at} < $1 ORDER BY {at} LIMIT $2)"
    )
    total = 0
    while total < max_rows:
        deleted, _ = await conn().execute_query(statement, [before, min(BATCH, max_rows - total)])
        total += deleted
        if deleted < BATCH:
            break
    return total
