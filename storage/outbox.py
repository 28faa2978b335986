"""The transactional outbox of lifecycle events out (CONTRACT §7).

Every state change that other services hear about writes its event here, in the transaction that
makes the change (``storage.state``, ``storage.expiry``): the event exists if and only if the
change committed, whether or not RabbitMQ is reachable at that moment. The relay
(``actors.outbox``) publishes pending rows in ``id`` order and marks them sent.

Delivery: exactly once in the normal case; at least once across crashes (a relay that dies after
the broker confirmed a batch and before its ``sent_at`` commit publishes that batch again), so a
consumer de-duplicates on ``event_id``.

Ordering: rows of one user are published in ``id`` (commit) order, even with several relays
claiming batches with ``FOR UPDATE SKIP LOCKED``: a relay leaves aside any row whose user has an
older pending row it did not claim itself (another relay holds it), and takes it on a later round.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from tortoise.backends.base.client import BaseDBAsyncClient

SESSION_STARTED: Final = "session.started"
SESSION_ENDED: Final = "session.ended"
USER_DISCONNECTED: Final = "user.disconnected"
TYPES: Final = (SESSION_STARTED, SESSION_ENDED, USER_DISCONNECTED)
REASONS: Final = frozenset({"logout", "idle_timeout", "max_lifetime", "admin", "session_limit"})


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One pending event as the relay publishes it."""

    id: int
    type: str
    event_id: str
    user_id: str
    session_id: str | None
    reason: str | None
    occurred_at: datetime

    def body(self) -> dict[str, Any]:
        """The wire body (CONTRACT §7)."""
        return {
            "type": self.type,
            "event_id": self.event_id,
            "user_id": self.user_id,
            "session_id": self.session_id,
            "reason": self.reason,
            "occurred_at": self.occurred_at.astimezone(UTC).isoformat(),
        }

    def encode(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> OutboxRow:
        return cls(
            id=int(row["id"]),
            type=str(row["type"]),
            event_id=str(row["event_id"]),
            user_id=str(row["user_id"]),
            session_id=row["session_id"],
            reason=row["reason"],
            occurred_at=row["occurred_at"],
        )


# Lock a batch of the oldest pending rows (skipping those another relay holds), then keep only
# rows whose user has no older pending row outside the batch: that row belongs to another relay,
# which must publish it first.
_CLAIM: Final = """
WITH claimed AS MATERIALIZED (
    SELECT id, user_id FROM outbox WHERE sent_at IS NULL
    ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
)
SELECT o.id, o.type, o.event_id, o.user_id, o.session_id, o.reason, o.occurred_at
FROM outbox o JOIN claimed c ON c.id = o.id
WHERE NOT EXISTS (
    SELECT 1 FROM outbox p
    WHERE p.user_id = c.user_id AND p.sent_at IS NULL AND p.id < c.id
      AND p.id NOT IN (SELECT id FROM claimed)
)
ORDER BY o.id
"""


async def claim(db: BaseDBAsyncClient, limit: int) -> list[OutboxRow]:
    """The next rows to publish, locked until the caller's transaction ends."""
    rows = await db.execute_query_dict(_CLAIM, [limit])
    return [OutboxRow.from_row(r) for r in rows]


async def mark_sent(db: BaseDBAsyncClient, ids: Sequence[int], *, at: datetime) -> None:
    if ids:
        await db.execute_query(
            "UPDATE outbox SET sent_at = $2 WHERE id = ANY($1::bigint[])", [list(ids), at]
        )


async def pending_count(db: BaseDBAsyncClient) -> int:
    rows = await db.execute_query_dict("SELECT count(*) AS n FROM outbox WHERE sent_at IS NULL")
    return int(rows[0]["n"])
