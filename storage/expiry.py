"""The expiry sweep: connected users silent for longer than the idle timeout are disconnected,
and sessions past their absolute lifetime end.

The sweep's SQL only selects candidates; the session rules (``storage.forced``: ``is_idle``,
``past_lifetime``, ``expire_idle``, ``expire_lifetime``) decide on the locked rows
and the unit of work (``storage.unit_of_work``) writes what they changed, as for an event or an
admin decision: one state machine, one writer of each row.

Idle candidates come from the partial index ``users_idle_idx`` (``seen_at`` of connected users) in
bounded batches, walked with a keyset on ``(seen_at, id)``. Each batch is one short transaction:

1. The batch's users are locked with ``FOR UPDATE SKIP LOCKED``: rows busy in another transaction
   (an event being applied) are left for the next sweep rather than waited for.
2. Pending activity still in Redis is consulted for the locked users: anyone active within the
   timeout is spared and that activity is written to their row at once.
3. The rules end the others' sessions (reason ``idle_timeout``), journal one ``expired`` audit row
   per ended session (one per user without an open session), write their ``session.ended`` and
   ``user.disconnected`` events to the outbox (``storage.outbox``), and mark the users
   disconnected with a bumped ``version``.

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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from storage import forced
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
from storage.models import CONNECTED
from storage.rows import EXPIRED as KIND
from storage.rows import EXPIRY_SOURCE as SOURCE
from storage.rows import IDLE_REASON as REASON
from storage.rows import LIFETIME_REASON
from storage.unit_of_work import UnitOfWork

log = logging.getLogger(__name__)

NEVER = datetime(1, 1, 1, tzinfo=UTC)
SAMPLE = 100  # expired user ids a real sweep reports (a dry run reports them all)
# The rules run on the worker's shared event loop: a 5,000-user batch yields to the actors
# applying events every few hundred users instead of holding the loop for its whole CPU time.
YIELD_EVERY = 250
__all__ = ["KIND", "LIFETIME_REASON", "REASON", "SOURCE", "SweepResult", "sweep"]

# Idle candidates: a superset is harmless (the rules decide on the locked rows), a miss is not.
_CANDIDATES = """
SELECT id, seen_at FROM users
WHERE status = $1 AND seen_at < $2 AND (seen_at, id) > ($3, $4)
ORDER BY seen_at, id
LIMIT $5
"""

# Lifetime candidates: users holding an open session started before the cutoff, by user id.
_LIFETIME_CANDIDATES = """
SELECT DISTINCT user_id FROM sessions
WHERE status = $1 AND started_at < $2 AND user_id > $3
ORDER BY user_id
LIMIT $4
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
    by_key: dict[str, list[str]] = {}
    for uid in user_ids:  # one HMGET per shard
        by_key.setdefault(buffer.layout.activity_key(uid), []).append(uid)
    out: dict[str, float] = {}
    for key, uids in by_key.items():
        values = await buffer.client.hmget(key, uids)
        out |= {uid: float(raw) for uid, raw in zip(uids, values, strict=True) if raw is not None}
    return out


async def _evict(cache: Cache, rows: Sequence[dict[str, Any]]) -> int:
    """Evicts ``user:<id>`` of the touched users unless a newer version is cached already. A row
    with ``status`` connected (the lifetime pass: another session is still open) is only evicted;
    the others are disconnections, marked gone (``storage.cache.gone_key``)."""
    gone = [(str(r["id"]), int(r["version"])) for r in rows if r.get("status") != CONNECTED]
    kept = [(str(r["id"]), int(r["version"])) for r in rows if r.get("status") == CONNECTED]
    evicted = await cache.evict_many(gone, disconnected=True)
    return evicted + await cache.evict_many(kept, disconnected=False)


def _settled(work: UnitOfWork, user_ids: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {"id": u, "version": work.users[u]["version"], "status": work.users[u]["status"]}
        for u in user_ids
    ]


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
    idle: list[str] = []
    active: dict[str, float] = {}
    async with transaction() as tx:
        rows = await tx.execute_query_dict(_CANDIDATES, params)
        if not rows:
            return True, last
        work = UnitOfWork(tx, Journal())
        held = set(await work.load([str(r["id"]) for r in rows], create=False, lock=_lock(dry_run)))
        ids = [str(r["id"]) for r in rows if str(r["id"]) in held]
        pending = await _pending(buffer, ids)
        for n, uid in enumerate(ids):
            if n % YIELD_EVERY == YIELD_EVERY - 1:
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
    if dry_run:
        result.users.extend(idle)
    elif idle:
        result.evicted += await _evict(cache, _settled(work, idle))
        room = SAMPLE - len(result.users)
        if room > 0:
            result.users.extend(idle[:room])
    result.examined += len(rows)
    result.expired += len(idle)
    result.spared += len(active)
    result.batches += 1
    tail = rows[-1]
    return len(rows) < batch_size, (tail["seen_at"], str(tail["id"]))


def _lock(dry_run: bool) -> str:
    """A dry run holds nothing; a real one skips users busy in another transaction."""
    return "none" if dry_run else "skip"


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
            result.evicted += await _evict(cache, settled)
        if len(candidates) < batch_size:
            return


async def _end_old_sessions(
    result: SweepResult, ids: list[str], *, now: datetime, max_s: int, dry_run: bool
) -> list[dict[str, Any]]:
    """One transaction: lock the users, let the rules end their old sessions, save."""
    async with transaction() as tx:
        work = UnitOfWork(tx, Journal())
        held = await work.load(ids, create=False, lock=_lock(dry_run))
        ended: dict[str, list[str]] = {}
        for n, uid in enumerate(held):
            if n % YIELD_EVERY == YIELD_EVERY - 1:
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
    room = SAMPLE - len(result.users)
    if room > 0:
        result.users.extend(gone[:room])
    log.info(
        "sessions past their lifetime ended",
        extra={"sessions": sessions, "users_disconnected": len(gone), "session_max_s": max_s},
    )
    return _settled(work, touched)
