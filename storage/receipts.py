"""First receipts: the stamps an event without a time of its own was first given, by its key.

Such an event's time is the ingress stamp, so a copy of it (a publisher re-publishing after a
lost confirm) stamped at its own receipt would be a different, later event: applied first while
the original waits in retries, it is ordered after events published in between, and the original
is then dropped as its duplicate. Remembering the first receipt by the de-duplication key (the
publisher's ``event_id``) gives every copy the original's stamps, as a replayed dead letter gets
back its own (``actors.deadletter.restored_stamps``): which copy is applied first no longer
matters. Rows are kept as long as the de-duplication ledger (``storage.retention``).
"""

from __future__ import annotations

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


# ``DO UPDATE`` (a no-op assignment) rather than ``DO NOTHING``: only then does ``RETURNING``
# give the conflicting row, whose stamps it leaves as they were.
_REMEMBER: Final = """
INSERT INTO event_receipts (key, received_at, stamped_at)
SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[])
ON CONFLICT (key) DO UPDATE SET key = excluded.key
RETURNING key, received_at, stamped_at
"""


def first_of_each(receipts: list[Receipt]) -> list[Receipt]:
    """One receipt per key, the earliest in the batch: one statement may not touch a row twice
    (``ON CONFLICT DO UPDATE``), and a copy later in the batch is a copy of the first."""
    seen: dict[str, Receipt] = {}
    for r in receipts:
        seen.setdefault(r.key, r)
    return list(seen.values())


async def remember(receipts: list[Receipt]) -> dict[str, Receipt]:
    """Stores the batch's receipts whose key has none yet, in one statement, and returns the
    stored receipt of every key: the one just written, or the one a previous copy left."""
    firsts = first_of_each(receipts)
    if not firsts:
        return {}
    rows = await conn().execute_query_dict(
        _REMEMBER,
        [
            [r.key for r in firsts],
            [r.received_at for r in firsts],
            [r.stamped_at for r in firsts],
        ],
    )
    return {row["key"]: Receipt(row["key"], row["received_at"], row["stamped_at"]) for row in rows}
