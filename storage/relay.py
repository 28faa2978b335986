"""The outbox relay's database side (``actors.outbox`` is the broker side): one round's
transaction, and the purge of published rows. Kept apart from ``storage.outbox`` (the row shape,
which the pure rules import) because it talks to PostgreSQL."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from storage.db import conn, transaction
from storage.outbox import OutboxRow, claim, mark_sent


async def relay_batch(
    limit: int, publish: Callable[[list[OutboxRow]], Awaitable[None]]
) -> list[OutboxRow]:
    """One relay round in one transaction: claim up to ``limit`` rows, ``publish`` them (it
    returns once the broker confirmed), mark them sent, commit. Whatever ``publish`` raises rolls
    the claim back, so the rows stay pending for the next round."""
    async with transaction() as tx:
        rows = await claim(tx, limit)
        if rows:
            await publish(rows)
            await mark_sent(tx, [r.id for r in rows], at=datetime.now(UTC))
        return rows


async def purge_sent(*, before: datetime, limit: int = 10_000) -> int:
    """Deletes published rows older than ``before`` (bounded, so one call stays short)."""
    rows = await conn().execute_query_dict(
        "WITH old AS (SELECT id FROM outbox WHERE sent_at < $1 ORDER BY sent_at LIMIT $2)"
        " DELETE FROM outbox o USING old WHERE o.id = old.id RETURNING o.id",
        [before, limit],
    )
    return len(rows)
