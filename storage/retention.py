"""The de-duplication ledger is kept for a bounded time, not forever.

``processed_events`` gains one row per event: at a thousand events a second, 86 million a day.
A redelivery comes back within the retry budget (an hour) or with a dead-letter replay, so the
ledger only has to remember a few days (``SESSIOND_DEDUP_RETENTION_S``, 7 by default). Past that,
the data still makes a redelivered event a no-op: each session keeps the time of its newest event
and each user the time of their last full logout, so the old event is refused as ``stale``
instead of ``duplicate``, and changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from storage.db import conn

BATCH: Final = 10_000

_PURGE: Final = """
DELETE FROM processed_events WHERE key IN (
    SELECT key FROM processed_events WHERE processed_at < $1 ORDER BY processed_at LIMIT $2
)
"""


async def purge_processed(*, before: datetime, max_rows: int = 200_000) -> int:
    """Deletes ledger rows older than ``before`` in short transactions of ``BATCH`` rows (a
    range scan on ``processed_events_at_idx``), at most ``max_rows`` a call: a backlog is worked
    off over several sweeps instead of in one long delete. Returns how many went."""
    total = 0
    while total < max_rows:
        deleted, _ = await conn().execute_query(_PURGE, [before, min(BATCH, max_rows - total)])
        total += deleted
        if deleted < BATCH:
            break
    return total
