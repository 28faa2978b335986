"""Session state changes: one PostgreSQL transaction each, then the Redis projection.

Ordering safety comes from the data, never from the queue (CONTRACT §1):
- each session remembers the time of the newest event applied to it (``last_event_at``); a
  ``connected`` applies only when strictly newer, a ``disconnected`` when at least as new, so on a
  tie the safer answer (refuse) wins;
- a ``disconnected`` without session id ends every session that began before it and records
  ``logged_out_at`` on the user, which fences off older ``connected`` events of any session;
- a ``disconnected`` for a session never seen leaves an ended row (a tombstone) behind, so the
  late ``connected`` it overtook is recognised as stale.

The user row is locked (``FOR UPDATE``) for the whole transaction, so one user's changes commit in
a total order and ``users.version`` increases with it; the cache refuses older versions.

Each change also writes its lifecycle events out (``session.started``, ``session.ended``,
``user.disconnected``) to the outbox in the same transaction (``storage.outbox``, CONTRACT §7).

Session rules (``Limits``): with ``SESSIOND_MAX_SESSIONS_PER_USER``, a session that starts beyond
the limit ends the user's oldest open sessions (reason ``session_limit``); the absolute lifetime
``SESSIOND_SESSION_MAX_S`` is enforced by the sweep (``storage.expiry``) and the API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.transactions import in_transaction

from sessiond.config import Settings, get_settings
from sessiond.events import Event
from storage import journal, outbox
from storage.cache import Cache, UserSnapshot
from storage.db import conn
from storage.models import CONNECTED, DISCONNECTED, ENDED

IMPLICIT = ""


@dataclass(frozen=True, slots=True)
class Limits:
    """Session rules applied when a session starts; ``None`` means unlimited."""

    max_sessions_per_user: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        limit = settings.max_sessions_per_user
        return cls(max_sessions_per_user=limit if limit and limit > 0 else None)


@dataclass(slots=True)
class Outcome:
    """What one change did; ``changed`` is False for duplicates and stale events."""

    user_id: str
    applied: bool
    reason: str
    snapshot: UserSnapshot | None = None
    ended_sessions: list[str] = field(default_factory=list)
    started_sessions: list[str] = field(default_factory=list)


async def audit(
    db: BaseDBAsyncClient,
    *,
    kind: str,
    source: str,
    user_id: str | None,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """One audit entry outside any unit of work (e.g. a dead letter, whose event never applied)."""
    entry = journal.Journal()
    entry.record_audit(kind=kind, source=source, user_id=user_id, reason=reason, detail=detail)
    await entry.flush(db)


@dataclass(slots=True)
class _Session:
    """A session row held (locked) by the unit of work; ``order`` sorts like ``(id)`` does, new
    rows after loaded ones in creation order (they are inserted in that order)."""

    user_id: str
    session_id: str
    status: str
    started_at: datetime
    last_event_at: datetime
    order: int
    ended_at: datetime | None = None
    end_reason: str | None = None
    ip_address: str | None = None
    source: str = "auth"
    dirty: bool = False


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
_LOCK_USERS = "SELECT * FROM users WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE"

# What the events can touch: every open session of the users, and the named ones in any state.
_LOCK_SESSIONS = """
SELECT s.id, s.user_id, s.session_id, s.status, s.started_at, s.ended_at, s.end_reason,
       s.last_event_at, s.ip_address, s.source
FROM sessions s
WHERE s.user_id = ANY($1::text[])
  AND (s.status = $2
       OR (s.user_id, s.session_id) IN (SELECT * FROM unnest($3::text[], $4::text[])))
ORDER BY s.id
FOR UPDATE
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

_NEW_ROW = 1 << 62


def _to_snapshot(
    user: dict[str, Any], open_sessions: Sequence[tuple[str, datetime]]
) -> UserSnapshot:
    return UserSnapshot(
        user_id=user["id"],
        status=user["status"],
        version=user["version"],
        name=user["name"],
        email=user["email"],
        sessions=[sid for sid, _ in open_sessions],
        session_started=dict(open_sessions),
        connected_at=user["connected_at"],
        seen_at=user["seen_at"],
        last_activity_at=user["last_activity_at"],
    )


async def _snapshot(db: BaseDBAsyncClient, user: dict[str, Any]) -> UserSnapshot:
    rows = await db.execute_query_dict(
        "SELECT session_id, started_at FROM sessions WHERE user_id = $1 AND status = $2"
        " ORDER BY started_at, id",
        [user["id"], CONNECTED],
    )
    return _to_snapshot(user, [(r["session_id"], r["started_at"]) for r in rows])


class UnitOfWork:
    """The state changes of one transaction, computed in memory over rows locked up front.

    ``load`` locks the users (in id order) and the sessions the events can touch with a few
    set-based statements; the rules then run in Python; ``save`` writes every changed session,
    user, audit entry and outbox event with one statement each. A handful of round trips per
    batch instead of several per event: round trips are what bounds the pipeline. Everything
    stays in the caller's transaction, so a failure rolls the whole unit back."""

    def __init__(self, db: BaseDBAsyncClient, batch: journal.Journal) -> None:
        self.db = db
        self.journal = batch
        self.users: dict[str, dict[str, Any]] = {}
        self.sessions: dict[str, dict[str, _Session]] = {}
        self._created = 0

    async def load(self, user_ids: Sequence[str], pairs: Sequence[tuple[str, str]] = ()) -> None:
        ids = sorted(set(user_ids))
        await self.db.execute_query(_NEW_USERS, [ids, DISCONNECTED])
        for row in await self.db.execute_query_dict(_LOCK_USERS, [ids]):
            self.users[row["id"]] = row
            self.sessions[row["id"]] = {}
        rows = await self.db.execute_query_dict(
            _LOCK_SESSIONS, [ids, CONNECTED, [u for u, _ in pairs], [s for _, s in pairs]]
        )
        for r in rows:
            self.sessions[r["user_id"]][r["session_id"]] = _Session(
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
        await self.journal.flush(self.db)

    # -- in-memory rules

    def _new_session(self, ev: Event, sid: str, status: str) -> _Session:
        self._created += 1
        row = _Session(
            user_id=ev.user_id,
            session_id=sid,
            status=status,
            started_at=ev.occurred_at,
            last_event_at=ev.occurred_at,
            order=_NEW_ROW + self._created,
            ip_address=ev.ip_address,
            source=ev.source,
            dirty=True,
        )
        if status == ENDED:  # a tombstone
            row.ended_at, row.end_reason, row.ip_address = ev.occurred_at, "logout", None
        self.sessions[ev.user_id][sid] = row
        return row

    def open_sessions(self, user_id: str) -> list[_Session]:
        rows = [s for s in self.sessions[user_id].values() if s.status == CONNECTED]
        return sorted(rows, key=lambda s: (s.started_at, s.order))

    def snapshot(self, user_id: str) -> UserSnapshot:
        opened = [(s.session_id, s.started_at) for s in self.open_sessions(user_id)]
        return _to_snapshot(self.users[user_id], opened)

    def end_sessions(
        self,
        user_id: str,
        *,
        at: datetime,
        reason: str,
        source: str,
        session_ids: Sequence[str] | None = None,
        kind: str = "disconnected",
        force: bool = False,
    ) -> list[str]:
        """Ends open sessions (all, or the named ones) not newer than ``at``; journals each one
        and writes its ``session.ended``. ``force`` ends them even when an event newer than
        ``at`` was applied to them (a rule or an admin decides, not the event order); their
        ordering fence stays at the newest of the two times."""
        ended = [
            s
            for s in self.open_sessions(user_id)
            if (force or s.last_event_at <= at)
            and (session_ids is None or s.session_id in session_ids)
        ]
        for s in ended:
            s.status, s.ended_at, s.end_reason = ENDED, at, reason
            s.last_event_at = max(s.last_event_at, at)
            s.dirty = True
        sids = [s.session_id for s in ended]
        self.journal.record_outbox(
            outbox.SESSION_ENDED, user_id=user_id, session_ids=sids, reason=reason, occurred_at=at
        )
        for sid in sids:
            self.journal.record_audit(
                kind=kind, source=source, user_id=user_id, session_id=sid or None,
                reason=reason, occurred_at=at,
            )  # fmt: skip
        return sids

    def settle(
        self, user_id: str, at: datetime, changed: bool, *, reason: str | None = None
    ) -> dict[str, Any]:
        """Derives the user's status from their sessions and bumps the version when anything
        changed; a user going from connected to disconnected emits ``user.disconnected``."""
        user = self.users[user_id]
        is_open = any(s.status == CONNECTED for s in self.sessions[user_id].values())
        status = CONNECTED if is_open else DISCONNECTED
        if status != user["status"]:
            changed = True
            if status == CONNECTED:
                user["connected_at"] = at
                user["seen_at"] = at
            else:
                user["disconnected_at"] = at
                self.journal.record_outbox(
                    outbox.USER_DISCONNECTED, user_id=user_id, reason=reason, occurred_at=at
                )
            user["status"] = status
        if changed:
            user["version"] += 1
            self.journal.users[user_id] = user
        return user

    def connect(self, ev: Event, out: Outcome, limits: Limits) -> bool:
        user = self.users[ev.user_id]
        sid = ev.session_id or IMPLICIT
        at = ev.occurred_at
        if user["logged_out_at"] is not None and at <= user["logged_out_at"]:
            out.reason = "stale"
            return False
        row = self.sessions[ev.user_id].get(sid)
        if row is not None and at <= row.last_event_at:
            out.reason = "stale"
            return False
        was_open = row is not None and row.status == CONNECTED
        if row is None:
            row = self._new_session(ev, sid, CONNECTED)
        else:
            if not was_open:
                row.started_at = at
            row.status, row.last_event_at, row.ended_at, row.end_reason = CONNECTED, at, None, None
            row.ip_address = ev.ip_address or row.ip_address
            row.dirty = True
        if ev.name is not None:
            user["name"] = ev.name
        if ev.email is not None:
            user["email"] = ev.email
        if user["status"] == CONNECTED:
            user["seen_at"] = max(filter(None, [user["seen_at"], at]))
        if not was_open:
            out.started_sessions.append(sid)
            self.journal.record_audit(
                kind="connected",
                source=ev.source,
                user_id=ev.user_id,
                session_id=sid or None,
                occurred_at=at,
                detail={"ip": ev.ip_address} if ev.ip_address else None,
            )
            self.journal.record_outbox(
                outbox.SESSION_STARTED, user_id=ev.user_id, session_ids=[sid], occurred_at=at
            )
            if limits.max_sessions_per_user is not None:
                out.ended_sessions += self._enforce_limit(
                    ev, sid, limit=limits.max_sessions_per_user
                )
        out.reason = "applied"
        return True

    def _enforce_limit(self, ev: Event, new_sid: str, *, limit: int) -> list[str]:
        """Ends the oldest open sessions beyond ``limit``; the one just started always stays."""
        others = [s for s in self.open_sessions(ev.user_id) if s.session_id != new_sid]
        keep = max(limit - 1, 0)
        oldest = others[: max(len(others) - keep, 0)]
        if not oldest:
            return []
        return self.end_sessions(
            ev.user_id, at=ev.occurred_at, reason="session_limit", source=ev.source,
            session_ids=[s.session_id for s in oldest], force=True,
        )  # fmt: skip

    def disconnect(self, ev: Event, out: Outcome) -> bool:
        user = self.users[ev.user_id]
        at = ev.occurred_at
        out.reason = "applied"
        if ev.session_id is None:
            if user["logged_out_at"] is None or at > user["logged_out_at"]:
                user["logged_out_at"] = at
            out.ended_sessions = self.end_sessions(
                ev.user_id, at=at, reason=ev.reason or "logout", source=ev.source
            )
            # The implicit session's tombstone keeps its own ordering fence as well.
            self._fence(ev, IMPLICIT)
            return True
        row = self.sessions[ev.user_id].get(ev.session_id)
        if row is None:
            self._new_session(ev, ev.session_id, ENDED)  # a tombstone: fences the late connect
            return True
        if at < row.last_event_at:
            out.reason = "stale"
            return False
        out.ended_sessions = self.end_sessions(
            ev.user_id, at=at, reason=ev.reason or "logout", source=ev.source,
            session_ids=[ev.session_id],
        )  # fmt: skip
        if not out.ended_sessions:
            self._fence(ev, ev.session_id)
        return True

    def _fence(self, ev: Event, sid: str) -> None:
        row = self.sessions[ev.user_id].get(sid)
        if row is None:
            self._new_session(ev, sid, ENDED)
        elif ev.occurred_at > row.last_event_at:
            row.last_event_at = ev.occurred_at
            row.dirty = True

    def apply(self, ev: Event, first_seen: bool, limits: Limits) -> Outcome:
        out = Outcome(user_id=ev.user_id, applied=False, reason="")
        if not first_seen:
            out.reason = "duplicate"
        elif ev.kind == "connected":
            out.applied = self.connect(ev, out, limits)
        else:
            out.applied = self.disconnect(ev, out)
        if not out.applied and out.reason:
            self.journal.record_audit(
                kind="ignored",
                source=ev.source,
                user_id=ev.user_id,
                session_id=ev.session_id,
                reason=out.reason,
                occurred_at=ev.occurred_at,
                detail={"event": ev.kind},
            )
        ended_by = "session_limit" if ev.kind == "connected" else ev.reason or "logout"
        self.settle(ev.user_id, ev.occurred_at, out.applied, reason=ended_by)
        return out


@asynccontextmanager
async def unit_of_work() -> AsyncIterator[UnitOfWork]:
    """A transaction with its unit of work, saved just before the commit."""
    async with in_transaction() as db:
        work = UnitOfWork(db, journal.Journal())
        yield work
        await work.save()


def _touched(events: Sequence[Event]) -> list[tuple[str, str]]:
    pairs = {(ev.user_id, ev.session_id or IMPLICIT) for ev in events}
    pairs |= {(ev.user_id, IMPLICIT) for ev in events if ev.kind == "disconnected"}
    return sorted(pairs)


async def apply_event(ev: Event, *, limits: Limits | None = None) -> Outcome:
    """Applies one event exactly once in effect; the caller syncs ``outcome.snapshot`` to Redis.

    ``limits`` defaults to the process settings (``SESSIOND_MAX_SESSIONS_PER_USER``)."""
    return (await apply_events([ev], limits=limits))[0]


async def apply_events(events: Sequence[Event], *, limits: Limits | None = None) -> list[Outcome]:
    """Applies a batch in ONE transaction (one commit, one WAL flush, a few round trips).

    Each user's events keep their arrival order. The outcomes come back in the events' order;
    only the last outcome of each user carries the snapshot to cache, the state after the whole
    batch. A failure rolls the whole batch back: retrying it is safe, every event being
    idempotent."""
    limits = limits or Limits.from_settings(get_settings())
    order = sorted(range(len(events)), key=lambda i: events[i].user_id)
    outcomes: list[Outcome | None] = [None] * len(events)
    async with unit_of_work() as work:
        await work.load([ev.user_id for ev in events], _touched(events))
        fresh = await work.first_seen([events[i] for i in order])
        for i, first in zip(order, fresh, strict=True):
            outcomes[i] = work.apply(events[i], first, limits)
        last = {events[i].user_id: i for i in order}
        for user_id, i in last.items():
            outcome = outcomes[i]
            assert outcome is not None
            outcome.snapshot = work.snapshot(user_id)
    return [o for o in outcomes if o is not None]


async def force_disconnect(
    user_id: str, *, reason: str, source: str, at: datetime | None = None
) -> Outcome:
    """Ends all of a user's sessions as a ``disconnected`` event would (admin route, CLI)."""
    when = at or datetime.now(UTC)
    out = Outcome(user_id=user_id, applied=True, reason="applied")
    async with unit_of_work() as work:
        await work.load([user_id])
        user = work.users[user_id]
        if user["logged_out_at"] is None or when > user["logged_out_at"]:
            user["logged_out_at"] = when
        out.ended_sessions = work.end_sessions(
            user_id, at=when, reason=reason, source=source, kind="forced_disconnect", force=True
        )
        work.settle(user_id, when, True, reason=reason)
        out.snapshot = work.snapshot(user_id)
    return out


async def revoke_session(
    user_id: str, session_id: str, *, reason: str, source: str, at: datetime | None = None
) -> Outcome:
    """Ends one session of a user (``DELETE /admin/sessions/<id>``); the user stays connected
    while another of their sessions is open. ``applied`` is False when it was not open."""
    when = at or datetime.now(UTC)
    out = Outcome(user_id=user_id, applied=False, reason="not_open")
    async with unit_of_work() as work:
        await work.load([user_id])
        out.ended_sessions = work.end_sessions(
            user_id, at=when, reason=reason, source=source, session_ids=[session_id],
            kind="forced_disconnect", force=True,
        )  # fmt: skip
        if out.ended_sessions:
            out.applied, out.reason = True, "applied"
        work.settle(user_id, when, out.applied, reason=reason)
        out.snapshot = work.snapshot(user_id)
    return out


async def find_session_owners(session_id: str) -> list[str]:
    """The users holding a session with this id (ids are unique per user only)."""
    rows = await conn().execute_query_dict(
        "SELECT DISTINCT user_id FROM sessions WHERE session_id = $1 ORDER BY user_id",
        [session_id],
    )
    return [str(r["user_id"]) for r in rows]


async def load_snapshot(user_id: str) -> UserSnapshot | None:
    """The PostgreSQL side of cache-aside: ``None`` for a user never seen."""
    db = conn()
    rows = await db.execute_query_dict("SELECT * FROM users WHERE id = $1", [user_id])
    if not rows:
        return None
    return await _snapshot(db, rows[0])


async def publish_snapshot(cache: Cache, outcome: Outcome) -> None:
    """After commit, always (even for duplicates): a retry after a Redis failure heals the cache."""
    if outcome.snapshot is not None:
        await cache.sync(outcome.snapshot)
