"""Tables that grow with traffic are kept for a bounded time, not forever.

``processed_events`` gains one row per event: at a thousand events a second, 86 million a day.
A redelivery comes back within the retry budget (an hour) or with a dead-letter replay, so the
ledger only has to remember a few days (``SESSIOND_DEDUP_RETENTION_S``, 7 by default). Past that,
the data still makes a redelivered event a no-op: each session keeps the time of its newest event
and each user the time of their last full logout, so the old event is refused as ``stale``
instead of ``duplicate``, and changes nothing. Its rows go by batched ``DELETE``, and so do
those of ``event_receipts`` (``storage.receipts``), kept as long: a copy of an event comes back
within the same horizon as a redelivery.

``audit_events`` is partitioned (migration 0006): by class (access entries, lifecycle entries),
then by UTC day. The sweep creates each class's daily partitions ``SESSIOND_AUDIT_PARTITIONS_
AHEAD_DAYS`` ahead and drops those older than the class's retention
(``SESSIOND_AUDIT_ACCESS_RETENTION_DAYS``, 30; ``SESSIOND_AUDIT_LIFECYCLE_RETENTION_DAYS``, 400;
0 keeps them forever): a day goes with one ``DROP TABLE``, no row-by-row delete, no bloat. Rows
that ever land in a class's DEFAULT partition (no day partition yet) are deleted by batches once
past the same retention.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Final

from storage.db import conn

log = logging.getLogger(__name__)

BATCH: Final = 10_000
AUDIT_CLASSES: Final = {"access": "audit_events_access", "lifecycle": "audit_events_lifecycle"}
_DAY: Final = re.compile(r"_p(\d{8})$")

# table -> (its key, its time column); both time columns are indexed.
_TABLES: Final = {
    "processed_events": ("key", "processed_at"),
    "event_receipts": ("key", "received_at"),
    "audit_events_access_default": ("id", "at"),
    "audit_events_lifecycle_default": ("id", "at"),
}

_PARTITIONS = """
SELECT c.relname AS name FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
WHERE p.relname = $1
"""


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


async def audit_partitions(audit_class: str) -> dict[date, str]:
    """The class's daily partitions by day (its DEFAULT partition is not among them)."""
    rows = await conn().execute_query_dict(_PARTITIONS, [AUDIT_CLASSES[audit_class]])
    days: dict[date, str] = {}
    for row in rows:
        match = _DAY.search(row["name"])
        if match:
            days[datetime.strptime(match.group(1), "%Y%m%d").date()] = row["name"]
    return days


@dataclass(slots=True)
class PartitionResult:
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    purged: int = 0


async def maintain_audit_partitions(
    now: datetime, *, retention_days: dict[str, int], ahead_days: int
) -> PartitionResult:
    """Creates today's and the next ``ahead_days`` days' partitions of each class, drops the days
    wholly older than the class's retention (``retention_days[class]``, 0: keep forever)."""
    result = PartitionResult()
    today = now.date()
    for audit_class, parent in AUDIT_CLASSES.items():
        existing = await audit_partitions(audit_class)
        for offset in range(ahead_days + 1):
            day = today + timedelta(days=offset)
            if day not in existing:
                rows = await conn().execute_query_dict(
                    "SELECT audit_partition_create($1, $2) AS made", [parent, day]
                )
                if rows[0]["made"]:
                    result.created.append(f"{parent}_p{day:%Y%m%d}")
        keep = retention_days.get(audit_class, 0)
        if not keep:
            continue
        cutoff = now - timedelta(days=keep)
        for day, name in sorted(existing.items()):
            if day + timedelta(days=1) <= cutoff.date():  # the whole day is past the retention
                await conn().execute_script(f'DROP TABLE IF EXISTS "{name}"')  # a catalog name
                result.dropped.append(name)
        result.purged += await purge(f"{parent}_default", before=cutoff)
    if result.created or result.dropped:
        log.info(
            "audit partitions maintained",
            # not ``created``: a LogRecord attribute, which ``extra`` may not overwrite
            extra={"partitions_created": result.created, "partitions_dropped": result.dropped},
        )
    return result
