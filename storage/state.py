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

import json
from collections.abc import Sequence
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


async def _lock_user(db: BaseDBAsyncClient, user_id: str) -> dict[str, Any]:
    await db.execute_query(
        "INSERT INTO users (id, status, version, created_at, updated_at) "
        "VALUES ($1, $2, 0, now(), now()) ON CONFLICT (id) DO NOTHING",
        [user_id, DISCONNECTED],
    )
    rows = await db.execute_query_dict("SELECT * FROM users WHERE id = $1 FOR UPDATE", [user_id])
    return rows[0]


async def _snapshot(db: BaseDBAsyncClient, user: dict[str, Any]) -> UserSnapshot:
    rows = await db.execute_query_dict(
        "SELECT session_id, started_at FROM sessions WHERE user_id = $1 AND status = $2"
        " ORDER BY started_at",
        [user["id"], CONNECTED],
    )
    return UserSnapshot(
        user_id=user["id"],
        status=user["status"],
        version=user["version"],
        name=user["name"],
        email=user["email"],
        sessions=[r["session_id"] for r in rows],
        session_started={r["session_id"]: r["started_at"] for r in rows},
        connected_at=user["connected_at"],
        seen_at=user["seen_at"],
        last_activity_at=user["last_activity_at"],
    )


async def audit(
    db: BaseDBAsyncClient,
    *,
    kind: str,
    source: str,
    user_id: str | None,
    session_id: str | None = None,
    reason: str | None = None,
    occurred_at: datetime | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    row = (
        occurred_at,
        user_id,
        session_id,
        kind,
        reason,
        source,
        json.dumps(detail) if detail is not None else None,
    )
    batch = journal.current()
    if batch is not None:
        batch.audit.append(row)
        return
    await db.execute_query(
        "INSERT INTO audit_events"
        " (at, occurred_at, user_id, session_id, kind, reason, source, detail)"
        " VALUES (now(), $1, $2, $3, $4, $5, $6, $7)",
        list(row),
    )


async def _settle_user(
    db: BaseDBAsyncClient,
    user: dict[str, Any],
    at: datetime,
    changed: bool,
    *,
    reason: str | None = None,
) -> dict[str, Any]:
    """Derives the user's status from their sessions and bumps the version when anything changed;
    a user going from connected to disconnected emits ``user.disconnected`` with ``reason``."""
    rows = await db.execute_query_dict(
        "SELECT count(*) AS n FROM sessions WHERE user_id = $1 AND status = $2",
        [user["id"], CONNECTED],
    )
    status = CONNECTED if rows[0]["n"] > 0 else DISCONNECTED
    if status != user["status"]:
        changed = True
        if status == CONNECTED:
            user["connected_at"] = at
            user["seen_at"] = at
        else:
            user["disconnected_at"] = at
            await outbox.record(
                db, outbox.USER_DISCONNECTED, user_id=user["id"], reason=reason, occurred_at=at
            )
        user["status"] = status
    if changed:
        user["version"] += 1
        batch = journal.current()
        if batch is not None:  # written once, at the end of the batch, in its final state
            batch.users[user["id"]] = user
            return user
        await db.execute_query(
            "UPDATE users SET status = $2, name = $3, email = $4, connected_at = $5, "
            "disconnected_at = $6, seen_at = $7, logged_out_at = $8, version = $9,"
            " updated_at = now() "
            "WHERE id = $1",
            [
                user["id"],
                user["status"],
                user["name"],
                user["email"],
                user["connected_at"],
                user["disconnected_at"],
                user["seen_at"],
                user["logged_out_at"],
                user["version"],
            ],
        )
    return user


async def _connect(
    db: BaseDBAsyncClient, ev: Event, user: dict[str, Any], out: Outcome, limits: Limits
) -> bool:
    sid = ev.session_id or IMPLICIT
    at = ev.occurred_at
    if user["logged_out_at"] is not None and at <= user["logged_out_at"]:
        out.reason = "stale"
        return False
    rows = await db.execute_query_dict(
        "SELECT id, status, last_event_at FROM sessions"
        " WHERE user_id = $1 AND session_id = $2 FOR UPDATE",
        [ev.user_id, sid],
    )
    if rows and at <= rows[0]["last_event_at"]:
        out.reason = "stale"
        return False
    if not rows:
        await db.execute_query(
            "INSERT INTO sessions"
            " (user_id, session_id, status, started_at, last_event_at, ip_address, source)"
            " VALUES ($1, $2, $3, $4, $4, $5, $6)",
            [ev.user_id, sid, CONNECTED, at, ev.ip_address, ev.source],
        )
    else:
        await db.execute_query(
            "UPDATE sessions SET status = $2, last_event_at = $3, ended_at = NULL,"
            " end_reason = NULL,"
            " started_at = CASE WHEN $5 THEN started_at ELSE $3 END,"
            " ip_address = COALESCE($4, ip_address) WHERE id = $1",
            [rows[0]["id"], CONNECTED, at, ev.ip_address, rows[0]["status"] == CONNECTED],
        )
    if ev.name is not None:
        user["name"] = ev.name
    if ev.email is not None:
        user["email"] = ev.email
    if user["status"] == CONNECTED:
        user["seen_at"] = max(filter(None, [user["seen_at"], at]))
    if not rows or rows[0]["status"] != CONNECTED:
        out.started_sessions.append(sid)
        await audit(
            db,
            kind="connected",
            source=ev.source,
            user_id=ev.user_id,
            session_id=sid or None,
            occurred_at=at,
            detail={"ip": ev.ip_address} if ev.ip_address else None,
        )
        await outbox.record(
            db, outbox.SESSION_STARTED, user_id=ev.user_id, session_ids=[sid], occurred_at=at
        )
        if limits.max_sessions_per_user is not None:
            out.ended_sessions += await _enforce_limit(
                db, ev, sid, limit=limits.max_sessions_per_user
            )
    out.reason = "applied"
    return True


async def _enforce_limit(
    db: BaseDBAsyncClient, ev: Event, new_sid: str, *, limit: int
) -> list[str]:
    """Ends the oldest open sessions beyond ``limit``; the one just started always stays."""
    rows = await db.execute_query_dict(
        "SELECT session_id FROM sessions WHERE user_id = $1 AND status = $2 AND session_id <> $3"
        " ORDER BY started_at DESC, id DESC OFFSET $4",
        [ev.user_id, CONNECTED, new_sid, max(limit - 1, 0)],
    )
    if not rows:
        return []
    oldest = [r["session_id"] for r in rows]
    return await end_sessions(
        db, ev.user_id, at=ev.occurred_at, reason="session_limit", source=ev.source,
        session_ids=oldest, force=True,
    )  # fmt: skip


async def end_sessions(
    db: BaseDBAsyncClient,
    user_id: str,
    *,
    at: datetime,
    reason: str,
    source: str,
    session_ids: Sequence[str] | None = None,
    kind: str = "disconnected",
    force: bool = False,
) -> list[str]:
    """Ends open sessions (all, or the named ones) not newer than ``at``; journals each one and
    writes its ``session.ended``. ``force`` ends them even when an event newer than ``at`` was
    applied to them (a rule or an admin decides, not the event order); their ordering fence
    stays at the newest of the two times."""
    fence = "" if force else " AND last_event_at <= $3"
    rows = await db.execute_query_dict(
        "UPDATE sessions SET status = $2, ended_at = $3, end_reason = $4,"
        " last_event_at = GREATEST(last_event_at, $3)"
        f" WHERE user_id = $1 AND status = $5{fence}"
        " AND ($6::text[] IS NULL OR session_id = ANY($6::text[]))"
        " RETURNING session_id, started_at, id",
        [user_id, ENDED, at, reason, CONNECTED, None if session_ids is None else list(session_ids)],
    )
    rows.sort(key=lambda r: (r["started_at"], r["id"]))
    ended = [r["session_id"] for r in rows]
    await outbox.record(
        db, outbox.SESSION_ENDED, user_id=user_id, session_ids=ended, reason=reason, occurred_at=at
    )
    for sid in ended:
        await audit(
            db,
            kind=kind,
            source=source,
            user_id=user_id,
            session_id=sid or None,
            reason=reason,
            occurred_at=at,
        )
    return ended


async def _disconnect(db: BaseDBAsyncClient, ev: Event, user: dict[str, Any], out: Outcome) -> bool:
    at = ev.occurred_at
    if ev.session_id is None:
        if user["logged_out_at"] is None or at > user["logged_out_at"]:
            user["logged_out_at"] = at
        out.ended_sessions = await end_sessions(
            db, ev.user_id, at=at, reason="logout", source=ev.source
        )
        # The implicit session's tombstone keeps its own ordering fence as well.
        await db.execute_query(
            "INSERT INTO sessions (user_id, session_id, status, started_at, ended_at, end_reason,"
            " last_event_at, source) VALUES ($1, $2, $3, $4, $4, 'logout', $4, $5)"
            " ON CONFLICT (user_id, session_id) DO UPDATE SET last_event_at ="
            " GREATEST(sessions.last_event_at, EXCLUDED.last_event_at)",
            [ev.user_id, IMPLICIT, ENDED, at, ev.source],
        )
        out.reason = "applied"
        return True
    rows = await db.execute_query_dict(
        "SELECT id, status, last_event_at FROM sessions"
        " WHERE user_id = $1 AND session_id = $2 FOR UPDATE",
        [ev.user_id, ev.session_id],
    )
    if not rows:
        await db.execute_query(
            "INSERT INTO sessions (user_id, session_id, status, started_at, ended_at, end_reason,"
            " last_event_at, source) VALUES ($1, $2, $3, $4, $4, 'logout', $4, $5)",
            [ev.user_id, ev.session_id, ENDED, at, ev.source],
        )
        out.reason = "applied"
        return True
    if at < rows[0]["last_event_at"]:
        out.reason = "stale"
        return False
    out.ended_sessions = await end_sessions(
        db, ev.user_id, at=at, reason="logout", source=ev.source, session_ids=[ev.session_id]
    )
    if not out.ended_sessions:
        await db.execute_query(
            "UPDATE sessions SET last_event_at = GREATEST(last_event_at, $2) WHERE id = $1",
            [rows[0]["id"], at],
        )
    out.reason = "applied"
    return True


async def _apply(
    db: BaseDBAsyncClient,
    ev: Event,
    limits: Limits,
    locked: dict[str, dict[str, Any]],
    *,
    snapshot: bool = True,
) -> Outcome:
    """One event inside the caller's transaction; ``locked`` holds the user rows already locked
    (and kept current) by this transaction."""
    out = Outcome(user_id=ev.user_id, applied=False, reason="")
    user = locked.get(ev.user_id)
    if user is None:
        user = locked[ev.user_id] = await _lock_user(db, ev.user_id)
    rows = await db.execute_query_dict(
        "INSERT INTO processed_events (key, user_id, processed_at) VALUES ($1, $2, now())"
        " ON CONFLICT (key) DO NOTHING RETURNING key",
        [ev.dedup_key(), ev.user_id],
    )
    if not rows:
        out.reason = "duplicate"
    elif ev.kind == "connected":
        out.applied = await _connect(db, ev, user, out, limits)
    else:
        out.applied = await _disconnect(db, ev, user, out)
    if not out.applied and out.reason:
        await audit(
            db,
            kind="ignored",
            source=ev.source,
            user_id=ev.user_id,
            session_id=ev.session_id,
            reason=out.reason,
            occurred_at=ev.occurred_at,
            detail={"event": ev.kind},
        )
    ended_by = "session_limit" if ev.kind == "connected" else "logout"
    user = await _settle_user(db, user, ev.occurred_at, out.applied, reason=ended_by)
    if snapshot:
        out.snapshot = await _snapshot(db, user)
    return out


async def apply_event(ev: Event, *, limits: Limits | None = None) -> Outcome:
    """Applies one event exactly once in effect; the caller syncs ``outcome.snapshot`` to Redis.

    ``limits`` defaults to the process settings (``SESSIOND_MAX_SESSIONS_PER_USER``)."""
    limits = limits or Limits.from_settings(get_settings())
    async with in_transaction() as db:
        return await _apply(db, ev, limits, {})


async def apply_events(events: Sequence[Event], *, limits: Limits | None = None) -> list[Outcome]:
    """Applies a batch in ONE transaction: one commit (one WAL flush) for the whole batch instead
    of one per event, which is what bounds throughput.

    Users are locked in id order (each user's events keep their arrival order), so two batches
    running at once can wait for each other but never deadlock. The outcomes come back in the
    events' order; only the last outcome of each user carries the snapshot to cache, the state
    after the whole batch. A failure rolls the whole batch back: retrying it is safe, every event
    being idempotent."""
    limits = limits or Limits.from_settings(get_settings())
    order = sorted(range(len(events)), key=lambda i: events[i].user_id)
    last = {events[i].user_id: i for i in order}
    outcomes: list[Outcome | None] = [None] * len(events)
    locked: dict[str, dict[str, Any]] = {}
    async with in_transaction() as db, journal.batched(db):
        for i in order:
            ev = events[i]
            outcomes[i] = await _apply(db, ev, limits, locked, snapshot=last[ev.user_id] == i)
    return [o for o in outcomes if o is not None]


async def force_disconnect(
    user_id: str, *, reason: str, source: str, at: datetime | None = None
) -> Outcome:
    """Ends all of a user's sessions as a ``disconnected`` event would (admin route, CLI)."""
    when = at or datetime.now(UTC)
    out = Outcome(user_id=user_id, applied=True, reason="applied")
    async with in_transaction() as db:
        user = await _lock_user(db, user_id)
        if user["logged_out_at"] is None or when > user["logged_out_at"]:
            user["logged_out_at"] = when
        out.ended_sessions = await end_sessions(
            db, user_id, at=when, reason=reason, source=source, kind="forced_disconnect",
            force=True,
        )  # fmt: skip
        user = await _settle_user(db, user, when, True, reason=reason)
        out.snapshot = await _snapshot(db, user)
    return out


async def revoke_session(
    user_id: str, session_id: str, *, reason: str, source: str, at: datetime | None = None
) -> Outcome:
    """Ends one session of a user (``DELETE /admin/sessions/<id>``); the user stays connected
    while another of their sessions is open. ``applied`` is False when it was not open."""
    when = at or datetime.now(UTC)
    out = Outcome(user_id=user_id, applied=False, reason="not_open")
    async with in_transaction() as db:
        user = await _lock_user(db, user_id)
        out.ended_sessions = await end_sessions(
            db, user_id, at=when, reason=reason, source=source, session_ids=[session_id],
            kind="forced_disconnect", force=True,
        )  # fmt: skip
        if out.ended_sessions:
            out.applied, out.reason = True, "applied"
        user = await _settle_user(db, user, when, out.applied, reason=reason)
        out.snapshot = await _snapshot(db, user)
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
