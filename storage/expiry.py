"""The expiry sweep: sessions silent for longer than the idle timeout end (each on its own, or
all of a silent user's with ``SESSIOND_IDLE_SCOPE=user``), and sessions past their absolute
lifetime end.

The sweep's SQL only selects candidates; the session rules (``storage.forced``: ``is_idle``,
``past_lifetime``, ``expire_idle``, ``expire_lifetime``) decide on the locked rows
and the unit of work (``storage.unit_of_work``) writes what they changed, as for an event or an
admin decision: one state machine, one writer of each row.

Idle candidates come in bounded batches, walked with a keyset: with the default per-session
scope, open sessions by their newest sign of life (``sessions_idle_idx`` on
``COALESCE(last_seen_at, started_at)``, migration 0007; keyset on that time and the row id); with
``SESSIOND_IDLE_SCOPE=user``, connected users from ``users_idle_idx`` (keyset on ``(seen_at,
id)``). Each batch is one short transaction:

1. The batch's users are locked with ``FOR UPDATE SKIP LOCKED``: rows busy in another transaction
   (an event being applied) are left for the next sweep rather than waited for.
2. Pending activity still in Redis is consulted for the locked rows (the sessions' entries, or
   the users'): whatever was active within the timeout is spared (a spared user's activity is
   written to their row at once; a spared session's waits for the next flush).
3. The rules (``expire_idle_sessions``, ``expire_idle``) end the idle sessions (reason
   ``idle_timeout``), journal one ``expired`` audit row per ended session (one per user without
   an open session), write their ``session.ended`` events to the outbox (``storage.outbox``),
   and disconnect, with ``user.disconnected`` and a bumped ``version``, the users left without
   an open session. A user who keeps one is evicted from the cache, not marked gone.

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

A dry run loads the same rows without locking them and runs the same rules, then saves nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sessiond.config import IdleScope
from storage import forced, sweeping
from storage.activity import AccessLog, ActivityBuffer
from storage.cache import Cache
from storage.db import conn, transaction
from storage.flush import (
    LOCK_TTL_S,
    activity_lock,
    flush_pending,
    release,
    write_activity,
)
from storage.journal import Journal
from storage.keys import session_field
from storage.models import CONNECTED
from storage.rows import EXPIRED as KIND
from storage.rows import EXPIRY_SOURCE as SOURCE
from storage.rows import IDLE_REASON as REASON
from storage.rows import LIFETIME_REASON
from storage.sweeping import SweepResult
from storage.unit_of_work import UnitOfWork

log = logging.getLogger(__name__)

NEVER = datetime(1, 1, 1, tzinfo=UTC)
__all__ = ["KIND", "LIFETIME_REASON", "REASON", "SOURCE", "SweepResult", "sweep"]

# Idle candidates: a superset is harmless (the rules decide on the locked rows), a miss is not.
_CANDIDATES = """
SELECT id, seen_at FROM users
WHERE status = $1 AND seen_at < $2 AND (seen_at, id) > ($3, $4)
ORDER BY seen_at, id
LIMIT $5
"""

# Idle session candidates (the per-session scope), the same way: the rules decide.
_SESSION_CANDIDATES = """
SELECT id, user_id, COALESCE(last_seen_at, started_at) AS seen FROM sessions
WHERE status = $1 AND COALESCE(last_seen_at, started_at) < $2
  AND (COALESCE(last_seen_at, started_at), id) > ($3, $4)
ORDER BY COALESCE(last_seen_at, started_at), id
LIMIT $5
"""

# Lifetime candidates: users holding an open session started before the cutoff, by user id.
_LIFETIME_CANDIDATES = """
SELECT DISTINCT user_id FROM sessions
WHERE status = $1 AND started_at < $2 AND user_id > $3
ORDER BY user_id
LIMIT $4
"""


async def _pending(buffer: ActivityBuffer, user_ids: Sequence[str]) -> dict[str, float]:
    """Buffered activity (epoch seconds) of these users, from the live hash."""
    by_key: dict[str, list[str]] = {}
    for uid in user_ids:  # one HMGET per shard
        by_key.setdefault(buffer.layout.activity_key(uid), []).append(uid)
    out: dict[str, float] = {}
    for key, uids in by_key.items():
        values = await buffer.client.hmget(key, uids)
        out |= {uid: float(raw) for uid, raw in zip(uids, values, strict=True) if raw is not None}
    return out


async def _pending_sessions(
    buffer: ActivityBuffer, pairs: Sequence[tuple[str, str]]
) -> dict[str, dict[str, datetime]]:
    """Buffered activity of these (user, session) pairs, by user then session id."""
    by_key: dict[str, list[tuple[str, str]]] = {}
    for pair in pairs:  # one HMGET per shard
        by_key.setdefault(buffer.layout.session_activity_key(pair[0]), []).append(pair)
    out: dict[str, dict[str, datetime]] = {}
    for key, group in by_key.items():
        values = await buffer.client.hmget(key, [session_field(u, s) for u, s in group])
        for (uid, sid), raw in zip(group, values, strict=True):
            if raw is not None:
                out.setdefault(uid, {})[sid] = datetime.fromtimestamp(float(raw), tz=UTC)
    return out


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
    idle_scope: IdleScope = "session",
) -> SweepResult:
    """One sweep at ``now`` (injectable); ``dry_run`` only reports who would be expired.

    ``idle_scope`` is ``SESSIOND_IDLE_SCOPE``'s (each session measured on its own, or the user).
    With ``session_max_s``, sessions started longer ago than that are ended too (reason
    ``max_lifetime``), after the idle pass."""
    started = time.perf_counter()
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(seconds=idle_timeout_s)
    result = SweepResult(
        dry_run=dry_run, now=now.isoformat(), cutoff=cutoff.isoformat(), idle_scope=idle_scope
    )
    idle_pass = _session_batch if idle_scope == "session" else _batch
    lock = activity_lock(buffer.client, wait_s=lock_wait_s)
    if not await lock.acquire():
        result.skipped = True
        return result
    try:
        db = conn()
        if not dry_run:
            flushed = await flush_pending(buffer, db, access_log=access_log)
            result.flushed = flushed.to_dict()
        last: tuple[datetime, Any] = (NEVER, "" if idle_scope == "user" else 0)
        while True:
            await lock.extend(LOCK_TTL_S, replace_ttl=True)
            done, last = await idle_pass(
                cache, buffer, result, last=last, now=now, cutoff=cutoff,
                idle_timeout_s=idle_timeout_s, batch_size=batch_size, dry_run=dry_run,
            )  # fmt: skip
            if done:
                break
        if dry_run:  # a user with idle sessions in two batches is listed once
            result.users = list(dict.fromkeys(result.users))
            result.expired = len(result.users)
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
    idle: list[str] = []
    active: dict[str, float] = {}
    async with transaction() as tx:
        rows = await tx.execute_query_dict(_CANDIDATES, params)
        if not rows:
            return True, last
        work = UnitOfWork(tx, Journal())
        held = set(
            await work.load(
                [str(r["id"]) for r in rows], create=False, lock=sweeping.lock_mode(dry_run)
            )
        )
        ids = [str(r["id"]) for r in rows if str(r["id"]) in held]
        pending = await _pending(buffer, ids)
        for n, uid in enumerate(ids):
            if n % sweeping.YIELD_EVERY == sweeping.YIELD_EVERY - 1:
                await asyncio.sleep(0)
            at = pending.get(uid)
            when = datetime.fromtimestamp(at, tz=UTC) if at is not None else None
            ended = forced.expire_idle(
                work, uid, now=now, idle_timeout_s=idle_timeout_s, pending=when, commit=not dry_run
            )
            if ended is not None:
                idle.append(uid)
                result.sessions_ended += 0 if dry_run else len(ended)
            elif at is not None and at >= cutoff.timestamp():
                active[uid] = at
        if not dry_run:
            if active:
                entries = [(u, datetime.fromtimestamp(t, tz=UTC)) for u, t in active.items()]
                await write_activity(tx, entries)
            await work.save()
    sweeping.report(result, idle, [] if dry_run else idle)
    if idle and not dry_run:
        result.evicted += await sweeping.evict(cache, sweeping.settled(work, idle))
    result.examined += len(rows)
    result.spared += len(active)
    result.batches += 1
    tail = rows[-1]
    return len(rows) < batch_size, (tail["seen_at"], str(tail["id"]))


async def _session_batch(
    cache: Cache,
    buffer: ActivityBuffer,
    result: SweepResult,
    *,
    last: tuple[datetime, int],
    now: datetime,
    cutoff: datetime,
    idle_timeout_s: int,
    batch_size: int,
    dry_run: bool,
) -> tuple[bool, tuple[datetime, int]]:
    """One batch of idle session candidates: their users are locked and every open session of
    theirs is measured (a user's idle sessions end together); returns (no more candidates,
    keyset position)."""
    params = [CONNECTED, cutoff, last[0], last[1], batch_size]
    touched: list[str] = []
    async with transaction() as tx:
        rows = await tx.execute_query_dict(_SESSION_CANDIDATES, params)
        if not rows:
            return True, last
        work = UnitOfWork(tx, Journal())
        ids = sorted({str(r["user_id"]) for r in rows})
        held = await work.load(ids, create=False, lock=sweeping.lock_mode(dry_run))
        pairs = [(u, s.session_id) for u in held for s in work.open_sessions(u)]
        pending = await _pending_sessions(buffer, pairs)
        for n, uid in enumerate(held):
            if n % sweeping.YIELD_EVERY == sweeping.YIELD_EVERY - 1:
                await asyncio.sleep(0)
            mine = pending.get(uid, {})
            result.spared += sum(
                forced.session_idle(s, cutoff=cutoff)
                and not forced.session_idle(s, cutoff=cutoff, pending=mine.get(s.session_id))
                for s in work.open_sessions(uid)
            )
            ended = forced.expire_idle_sessions(
                work, uid, now=now, idle_timeout_s=idle_timeout_s, pending=mine,
                commit=not dry_run,
            )  # fmt: skip
            if ended:
                touched.append(uid)
                result.sessions_ended += 0 if dry_run else len(ended)
        if not dry_run:
            await work.save()
    gone = [] if dry_run else [u for u in touched if work.users[u]["status"] != CONNECTED]
    sweeping.report(result, touched, gone)
    if touched and not dry_run:
        result.evicted += await sweeping.evict(cache, sweeping.settled(work, touched))
    result.examined += len(rows)
    result.batches += 1
    tail = rows[-1]
    return len(rows) < batch_size, (tail["seen"], int(tail["id"]))


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
        settled = await _end_old_sessions(
            result, ids, now=now, max_s=session_max_s, dry_run=dry_run
        )
        if settled:
            result.evicted += await sweeping.evict(cache, settled)
        if len(candidates) < batch_size:
            return


async def _end_old_sessions(
    result: SweepResult, ids: list[str], *, now: datetime, max_s: int, dry_run: bool
) -> list[dict[str, Any]]:
    """One transaction: lock the users, let the rules end their old sessions, save."""
    async with transaction() as tx:
        work = UnitOfWork(tx, Journal())
        held = await work.load(ids, create=False, lock=sweeping.lock_mode(dry_run))
        ended: dict[str, list[str]] = {}
        for n, uid in enumerate(held):
            if n % sweeping.YIELD_EVERY == sweeping.YIELD_EVERY - 1:
                await asyncio.sleep(0)
            ended[uid] = forced.expire_lifetime(
                work, uid, now=now, session_max_s=max_s, commit=not dry_run
            )
        touched = [uid for uid, sids in ended.items() if sids]
        if not dry_run:
            await work.save()
    sessions = sum(len(sids) for sids in ended.values())
    result.lifetime_sessions_ended += sessions
    if dry_run:
        result.users.extend(u for u in touched if u not in result.users)
        return []
    gone = [u for u in touched if work.users[u]["status"] != CONNECTED]
    result.lifetime_users_disconnected += len(gone)
    room = sweeping.SAMPLE - len(result.users)
    if room > 0:
        result.users.extend(gone[:room])
    log.info(
        "sessions past their lifetime ended",
        extra={"sessions": sessions, "users_disconnected": len(gone), "session_max_s": max_s},
    )
    return sweeping.settled(work, touched)
