"""The idle expiry sweep: connected users silent for longer than the idle timeout are disconnected.

Candidates come from the partial index ``users_idle_idx`` (``seen_at`` of connected users) in
bounded batches, walked with a keyset on ``(seen_at, id)``. Each batch is one short transaction:

1. ``SELECT … FOR UPDATE SKIP LOCKED`` locks the batch; PostgreSQL re-checks the condition on the
   newest row version, and rows busy in another transaction (an event being applied) are left for
   the next sweep rather than waited for.
2. Pending activity still in Redis is consulted for the locked users: anyone active within the
   timeout is spared and that activity is written to their row at once.
3. Set-based statements end the others' sessions (reason ``idle_timeout``), journal one
   ``expired`` audit row per ended session (one per user without an open session), write their
   ``session.ended`` and ``user.disconnected`` events to the outbox (``storage.outbox``), and mark
   the users disconnected with a bumped ``version``.

With ``SESSIOND_SESSION_MAX_S``, a second pass ends open sessions older than that (reason
``max_lifetime``) in the same way, user batch by user batch; a user keeps connected while another
of their sessions is younger, and every touched user's cache entry is evicted (version-guarded)
so the next request reloads the shorter session list.

After the commit, their ``user:<id>`` keys are evicted by a script with the version guard of
``Cache.sync`` (a thousand users a call), so a slower writer can never bring an expired user back
into the cache, and a user who reconnected in between keeps their newer entry.

The sweep begins with a flush and holds the activity lock (``storage.flush``) to the end. A
request's time is always in PostgreSQL or still in the live ``activity`` hash (the flush deletes an
entry only after its row is committed), and each batch reads the hash with one ``HMGET`` after
locking its rows: a user active a second ago is never expired.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.transactions import in_transaction

from storage.activity import ACTIVITY_KEY, AccessLog, ActivityBuffer
from storage.cache import Cache
from storage.db import conn
from storage.flush import (
    LOCK_TTL_S,
    activity_lock,
    flush_pending,
    release,
    write_activity,
)
from storage.models import CONNECTED, DISCONNECTED, ENDED

log = logging.getLogger(__name__)

REASON = "idle_timeout"
KIND = "expired"
SOURCE = "expiry"
NEVER = datetime(1, 1, 1, tzinfo=UTC)
SAMPLE = 100  # expired user ids a real sweep reports (a dry run reports them all)

_CANDIDATES = """
SELECT id, seen_at FROM users
WHERE status = $1 AND seen_at < $2 AND (seen_at, id) > ($3, $4)
ORDER BY seen_at, id
LIMIT $5
"""

_END_SESSIONS = """
WITH ended AS (
    UPDATE sessions s
    SET status = $3, ended_at = $2, end_reason = $4, last_event_at = GREATEST(s.last_event_at, $2)
    WHERE s.user_id = ANY($1::text[]) AND s.status = $5
    RETURNING s.user_id, s.session_id, s.started_at, s.id
), events AS (
    INSERT INTO outbox (created_at, type, event_id, user_id, session_id, reason, occurred_at)
    SELECT now(), x.type, gen_random_uuid(), x.user_id, x.session_id, $4, $2 FROM (
        SELECT e.user_id, NULLIF(e.session_id, '') AS session_id, 'session.ended'::text AS type,
               0 AS ord, e.started_at, e.id
        FROM ended e
        UNION ALL
        SELECT u.id, NULL, 'user.disconnected', 1, NULL, NULL FROM unnest($1::text[]) AS u(id)
    ) x
    ORDER BY x.user_id, x.ord, x.started_at, x.id
    RETURNING 1
), journal AS (
    INSERT INTO audit_events (at, occurred_at, user_id, session_id, kind, reason, source, detail)
    SELECT now(), $2, e.user_id, NULLIF(e.session_id, ''), $6, $4, $7,
           jsonb_build_object('seen_at', u.seen_at, 'idle_timeout_s', $8::int)
    FROM ended e JOIN users u ON u.id = e.user_id
    UNION ALL
    SELECT now(), $2, u.id, NULL, $6, $4, $7,
           jsonb_build_object('seen_at', u.seen_at, 'idle_timeout_s', $8::int)
    FROM users u
    WHERE u.id = ANY($1::text[]) AND NOT EXISTS (SELECT 1 FROM ended e WHERE e.user_id = u.id)
    RETURNING 1
)
SELECT (SELECT count(*) FROM ended) AS sessions, (SELECT count(*) FROM journal) AS journaled,
       (SELECT count(*) FROM events) AS events
"""

_DISCONNECT = """
UPDATE users
SET status = $3, disconnected_at = $2, version = version + 1, updated_at = now()
WHERE id = ANY($1::text[])
RETURNING id, version
"""

# Absolute lifetime (``SESSIOND_SESSION_MAX_S``): users holding an open session started before the
# cutoff, walked by user id; each batch locks its users like the idle sweep does.
_LIFETIME_CANDIDATES = """
SELECT DISTINCT user_id FROM sessions
WHERE status = $1 AND started_at < $2 AND user_id > $3
ORDER BY user_id
LIMIT $4
"""

_LOCK_USERS = """
SELECT id FROM users WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE SKIP LOCKED
"""

_END_OLD_SESSIONS = """
WITH ended AS (
    UPDATE sessions s
    SET status = $3, ended_at = $2, end_reason = $4, last_event_at = GREATEST(s.last_event_at, $2)
    WHERE s.user_id = ANY($1::text[]) AND s.status = $5 AND s.started_at < $6
    RETURNING s.user_id, s.session_id, s.started_at, s.id
), events AS (
    INSERT INTO outbox (created_at, type, event_id, user_id, session_id, reason, occurred_at)
    SELECT now(), 'session.ended', gen_random_uuid(), e.user_id, NULLIF(e.session_id, ''), $4, $2
    FROM ended e
    ORDER BY e.user_id, e.started_at, e.id
    RETURNING 1
), journal AS (
    INSERT INTO audit_events (at, occurred_at, user_id, session_id, kind, reason, source, detail)
    SELECT now(), $2, e.user_id, NULLIF(e.session_id, ''), $7, $4, $8,
           jsonb_build_object('started_at', e.started_at, 'session_max_s', $9::int)
    FROM ended e
    RETURNING 1
)
SELECT user_id, count(*) AS n FROM ended GROUP BY user_id
"""

# After the sessions ended: users left without an open session are disconnected, every touched
# user gets a new version (their cached session list changed).
_SETTLE = """
UPDATE users u
SET status = CASE WHEN o.open THEN u.status ELSE $3 END,
    disconnected_at = CASE WHEN o.open THEN u.disconnected_at ELSE $2 END,
    version = u.version + 1, updated_at = now()
FROM (
    SELECT x.id, EXISTS (
        SELECT 1 FROM sessions s WHERE s.user_id = x.id AND s.status = $4
    ) AS open
    FROM unnest($1::text[]) AS x(id)
) o
WHERE u.id = o.id
RETURNING u.id, u.version, u.status
"""

_USERS_DISCONNECTED = """
INSERT INTO outbox (created_at, type, event_id, user_id, session_id, reason, occurred_at)
SELECT now(), 'user.disconnected', gen_random_uuid(), x.id, NULL, $2, $3
FROM unnest($1::text[]) AS x(id)
ORDER BY x.id
"""


@dataclass(slots=True)
class SweepResult:
    """What one sweep did; ``users`` lists who would be expired (dry run) or a sample (real run)."""

    dry_run: bool
    now: str
    cutoff: str
    examined: int = 0
    expired: int = 0
    spared: int = 0
    sessions_ended: int = 0
    batches: int = 0
    evicted: int = 0
    seconds: float = 0.0
    skipped: bool = False
    lifetime_sessions_ended: int = 0
    lifetime_users_disconnected: int = 0
    flushed: dict[str, Any] | None = None
    users: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _pending(buffer: ActivityBuffer, user_ids: Sequence[str]) -> dict[str, float]:
    """Buffered activity (epoch seconds) of these users, from the live hash."""
    values = await buffer.client.hmget(ACTIVITY_KEY, list(user_ids))
    return {uid: float(raw) for uid, raw in zip(user_ids, values, strict=True) if raw is not None}


async def _evict(cache: Cache, rows: Sequence[dict[str, Any]]) -> int:
    """Evicts ``user:<id>`` of the touched users unless a newer version is cached already. A row
    with ``status`` connected (the lifetime pass: another session is still open) is only evicted;
    the others are disconnections, marked gone (``storage.cache.gone_key``)."""
    gone = [(str(r["id"]), int(r["version"])) for r in rows if r.get("status") != CONNECTED]
    kept = [(str(r["id"]), int(r["version"])) for r in rows if r.get("status") == CONNECTED]
    evicted = await cache.evict_many(gone, disconnected=True)
    return evicted + await cache.evict_many(kept, disconnected=False)


async def _expire_batch(
    db: BaseDBAsyncClient, ids: list[str], *, now: datetime, idle_timeout_s: int
) -> tuple[int, list[dict[str, Any]]]:
    counts = await db.execute_query_dict(
        _END_SESSIONS, [ids, now, ENDED, REASON, CONNECTED, KIND, SOURCE, idle_timeout_s]
    )
    rows = await db.execute_query_dict(_DISCONNECT, [ids, now, DISCONNECTED])
    return int(counts[0]["sessions"]), rows


async def sweep(
    cache: Cache,
    buffer: ActivityBuffer,
    *,
    now: datetime | None = None,
    idle_timeout_s: int,
    batch_size: int,
    dry_run: bool = False,
    access_log: AccessLog | None = None,
    lock_wait_s: float = 30.0,
    session_max_s: int | None = None,
) -> SweepResult:
    """One sweep at ``now`` (injectable); ``dry_run`` only reports who would be expired.

    With ``session_max_s``, sessions started longer ago than that are ended too (reason
    ``max_lifetime``), after the idle pass."""
    started = time.perf_counter()
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(seconds=idle_timeout_s)
    result = SweepResult(dry_run=dry_run, now=now.isoformat(), cutoff=cutoff.isoformat())
    lock = activity_lock(buffer.client, wait_s=lock_wait_s)
    if not await lock.acquire():
        result.skipped = True
        return result
    try:
        db = conn()
        if not dry_run:
            flushed = await flush_pending(buffer, db, access_log=access_log)
            result.flushed = flushed.to_dict()
        last: tuple[datetime, str] = (NEVER, "")
        while True:
            await lock.extend(LOCK_TTL_S, replace_ttl=True)
            done, last = await _batch(
                cache, buffer, result, last=last, now=now, cutoff=cutoff,
                idle_timeout_s=idle_timeout_s, batch_size=batch_size, dry_run=dry_run,
            )  # fmt: skip
            if done:
                break
        if session_max_s:
            await _lifetime(
                cache, result, now=now, session_max_s=session_max_s, batch_size=batch_size,
                dry_run=dry_run, extend=lambda: lock.extend(LOCK_TTL_S, replace_ttl=True),
            )  # fmt: skip
    finally:
        await release(lock)
    result.seconds = round(time.perf_counter() - started, 4)
    return result


async def _batch(
    cache: Cache,
    buffer: ActivityBuffer,
    result: SweepResult,
    *,
    last: tuple[datetime, str],
    now: datetime,
    cutoff: datetime,
    idle_timeout_s: int,
    batch_size: int,
    dry_run: bool,
) -> tuple[bool, tuple[datetime, str]]:
    """One batch; returns (no more candidates, keyset position)."""
    params = [CONNECTED, cutoff, last[0], last[1], batch_size]
    expired: list[dict[str, Any]] = []
    async with in_transaction() as tx:
        query = _CANDIDATES if dry_run else _CANDIDATES + " FOR UPDATE SKIP LOCKED"
        rows = await tx.execute_query_dict(query, params)
        if not rows:
            return True, last
        ids = [str(r["id"]) for r in rows]
        pending = await _pending(buffer, ids)
        cutoff_ts = cutoff.timestamp()
        active = {uid: ts for uid, ts in pending.items() if ts >= cutoff_ts}
        idle = [uid for uid in ids if uid not in active]
        if dry_run:
            result.users.extend(idle)
        else:
            if active:
                entries = [(u, datetime.fromtimestamp(t, tz=UTC)) for u, t in active.items()]
                await write_activity(tx, entries)
            if idle:
                ended, expired = await _expire_batch(
                    tx, idle, now=now, idle_timeout_s=idle_timeout_s
                )
                result.sessions_ended += ended
    if expired:
        result.evicted += await _evict(cache, expired)
        room = SAMPLE - len(result.users)
        if room > 0:
            result.users.extend(str(r["id"]) for r in expired[:room])
    result.examined += len(rows)
    result.expired += len(expired) if not dry_run else len(idle)
    result.spared += len(active)
    result.batches += 1
    tail = rows[-1]
    return len(rows) < batch_size, (tail["seen_at"], str(tail["id"]))


LIFETIME_REASON = "max_lifetime"


async def _lifetime(
    cache: Cache,
    result: SweepResult,
    *,
    now: datetime,
    session_max_s: int,
    batch_size: int,
    dry_run: bool,
    extend: Callable[[], Awaitable[Any]],
) -> None:
    """Ends every open session started before ``now - session_max_s``, in batches of users."""
    cutoff = now - timedelta(seconds=session_max_s)
    last = ""
    while True:
        await extend()
        candidates = await conn().execute_query_dict(
            _LIFETIME_CANDIDATES, [CONNECTED, cutoff, last, batch_size]
        )
        if not candidates:
            return
        ids = [str(r["user_id"]) for r in candidates]
        last = ids[-1]
        if dry_run:
            rows = await conn().execute_query_dict(
                "SELECT count(*) AS n FROM sessions"
                " WHERE user_id = ANY($1::text[]) AND status = $2 AND started_at < $3",
                [ids, CONNECTED, cutoff],
            )
            result.lifetime_sessions_ended += int(rows[0]["n"])
            result.users.extend(u for u in ids if u not in result.users)
        else:
            settled = await _end_old_sessions(
                result, ids, now=now, cutoff=cutoff, max_s=session_max_s
            )
            if settled:
                result.evicted += await _evict(cache, settled)
        if len(candidates) < batch_size:
            return


async def _end_old_sessions(
    result: SweepResult, ids: list[str], *, now: datetime, cutoff: datetime, max_s: int
) -> list[dict[str, Any]]:
    """One transaction: lock the users, end their old sessions, settle the users, emit events."""
    async with in_transaction() as tx:
        locked = [str(r["id"]) for r in await tx.execute_query_dict(_LOCK_USERS, [ids])]
        if not locked:
            return []
        ended = await tx.execute_query_dict(
            _END_OLD_SESSIONS,
            [locked, now, ENDED, LIFETIME_REASON, CONNECTED, cutoff, KIND, SOURCE, max_s],
        )
        touched = [str(r["user_id"]) for r in ended]
        if not touched:
            return []
        settled = await tx.execute_query_dict(_SETTLE, [touched, now, DISCONNECTED, CONNECTED])
        gone = [str(r["id"]) for r in settled if r["status"] == DISCONNECTED]
        if gone:
            await tx.execute_query(_USERS_DISCONNECTED, [gone, LIFETIME_REASON, now])
    sessions = sum(int(r["n"]) for r in ended)
    result.lifetime_sessions_ended += sessions
    result.lifetime_users_disconnected += len(gone)
    room = SAMPLE - len(result.users)
    if room > 0:
        result.users.extend(gone[:room])
    log.info(
        "sessions past their lifetime ended",
        extra={"sessions": sessions, "users_disconnected": len(gone), "session_max_s": max_s},
    )
    return settled
