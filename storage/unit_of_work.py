"""The unit of work: load and lock the rows a change can touch, let the rules decide, save.

``load`` locks the users (in id order) and the sessions the change can touch with a few
set-based statements; the rules (``storage.rules.State``) then run in Python; ``save`` writes
every changed session, user, audit entry and outbox event with one statement each. A handful of
round trips per batch instead of several per event: round trips are what bounds the pipeline.
Everything stays in the caller's transaction, so a failure rolls the whole unit back.

The user row is locked (``FOR UPDATE``) for the whole transaction, so one user's changes commit in
a total order and ``users.version`` increases with it; the cache refuses older versions. Every
writer of session state locks the user first, so a session row is only changed under its user's
lock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from tortoise.backends.base.client import BaseDBAsyncClient

from sessiond.events import Event
from storage import journal
from storage.db import transaction
from storage.models import CONNECTED, DISCONNECTED
from storage.rows import Session
from storage.rules import State

_SESSION_COLUMNS = (
    "user_id",
    "session_id",
    "status",
    "started_at",
    "ended_at",
    "end_reason",
    "last_event_at",
    "ip_address",
    "source",
)

_NEW_USERS = """
INSERT INTO users (id, status, version, created_at, updated_at)
SELECT x.id, $2, 0, now(), now() FROM unnest($1::text[]) AS x(id) ORDER BY x.id
ON CONFLICT (id) DO NOTHING
"""

# ``ORDER BY`` under ``FOR UPDATE`` locks in id order: two units of work never deadlock.
_USERS = "SELECT * FROM users WHERE id = ANY($1::text[]) ORDER BY id"
_LOCK = {"wait": " FOR UPDATE", "skip": " FOR UPDATE SKIP LOCKED", "none": ""}

# What the change can touch: every open session of the users, and the named ones in any state.
_SESSIONS = """
SELECT s.id, s.user_id, s.session_id, s.status, s.started_at, s.ended_at, s.end_reason,
       s.last_event_at, s.ip_address, s.source
FROM sessions s
WHERE s.user_id = ANY($1::text[])
  AND (s.status = $2
       OR (s.user_id, s.session_id) IN (SELECT * FROM unnest($3::text[], $4::text[])))
ORDER BY s.id
"""

_PROCESSED = """
INSERT INTO processed_events (key, user_id, processed_at)
SELECT x.key, x.user_id, now() FROM unnest($1::text[], $2::text[]) AS x(key, user_id)
ON CONFLICT (key) DO NOTHING
RETURNING key
"""

_SAVE_SESSIONS = """
INSERT INTO sessions (user_id, session_id, status, started_at, ended_at, end_reason,
                      last_event_at, ip_address, source)
SELECT t.user_id, t.session_id, t.status, t.started_at, t.ended_at, t.end_reason,
       t.last_event_at, t.ip_address, t.source
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[],
            $6::text[], $7::timestamptz[], $8::text[], $9::text[]) WITH ORDINALITY
     AS t(user_id, session_id, status, started_at, ended_at, end_reason, last_event_at,
          ip_address, source, n)
ORDER BY t.n
ON CONFLICT (user_id, session_id) DO UPDATE SET
    status = EXCLUDED.status, started_at = EXCLUDED.started_at, ended_at = EXCLUDED.ended_at,
    end_reason = EXCLUDED.end_reason, last_event_at = EXCLUDED.last_event_at,
    ip_address = EXCLUDED.ip_address, source = EXCLUDED.source
"""


class UnitOfWork(State):
    """The rules' state, loaded from and saved to one transaction."""

    def __init__(self, db: BaseDBAsyncClient, batch: journal.Journal) -> None:
        super().__init__(batch)
        self.db = db

    async def load(
        self,
        user_ids: Sequence[str],
        pairs: Sequence[tuple[str, str]] = (),
        *,
        create: bool = True,
        lock: str = "wait",
    ) -> list[str]:
        """Loads the users and the sessions they can touch; returns the users held.

        ``create`` inserts users never seen (an event's); ``lock`` is ``wait`` (events, admin),
        ``skip`` (the sweep: a user busy in another transaction is left for the next sweep, so
        the users held can be fewer) or ``none`` (a dry run, which saves nothing)."""
        ids = sorted(set(user_ids))
        if create:
            await self.db.execute_query(_NEW_USERS, [ids, DISCONNECTED])
        held: list[str] = []
        for row in await self.db.execute_query_dict(_USERS + _LOCK[lock], [ids]):
            self.users[row["id"]] = row
            self.sessions[row["id"]] = {}
            held.append(row["id"])
        if not held:
            return held
        rows = await self.db.execute_query_dict(
            _SESSIONS + _LOCK["none" if lock == "none" else "wait"],
            [held, CONNECTED, [u for u, _ in pairs], [s for _, s in pairs]],
        )
        for r in rows:
            self.sessions[r["user_id"]][r["session_id"]] = Session(
                user_id=r["user_id"],
                session_id=r["session_id"],
                status=r["status"],
                started_at=r["started_at"],
                last_event_at=r["last_event_at"],
                order=r["id"],
                ended_at=r["ended_at"],
                end_reason=r["end_reason"],
                ip_address=r["ip_address"],
                source=r["source"],
            )
        return held

    async def first_seen(self, events: Sequence[Event]) -> list[bool]:
        """Records the events in the de-duplication ledger; True where an event is new (the first
        of equal keys within the batch wins, as it would one by one)."""
        keys = [ev.dedup_key() for ev in events]
        rows = await self.db.execute_query_dict(_PROCESSED, [keys, [ev.user_id for ev in events]])
        fresh = {r["key"] for r in rows}
        seen: list[bool] = []
        for key in keys:
            seen.append(key in fresh)
            fresh.discard(key)
        return seen

    async def save(self) -> None:
        changed = [s for by_id in self.sessions.values() for s in by_id.values() if s.dirty]
        if changed:
            changed.sort(key=lambda s: s.order)
            await self.db.execute_query(
                _SAVE_SESSIONS,
                [[getattr(s, c) for s in changed] for c in _SESSION_COLUMNS],
            )
            for s in changed:
                s.dirty = False
        await self.journal.flush(self.db)


@asynccontextmanager
async def unit_of_work() -> AsyncIterator[UnitOfWork]:
    """A transaction with its unit of work, saved just before the commit."""
    async with transaction() as db:
        work = UnitOfWork(db, journal.Journal())
        yield work
        await work.save()
