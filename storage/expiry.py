"""The idle expiry sweep: connected users silent for longer than the idle timeout are disconnected.

Candidates come from the partial index ``users_idle_idx`` (``seen_at`` of connected users) in
bounded batches, walked with a keyset on ``(seen_at, id)``. Each batch is one short transaction:

1. ``SELECT … FOR UPDATE SKIP LOCKED`` locks the batch; PostgreSQL re-checks the condition on the
   newest row version, and rows busy in another transaction (an event being applied) are left for
   the next sweep rather than waited for.
2. Pending activity still in Redis is consulted for the locked users: anyone active within the
   timeout is spared and that activity is written to their row at once.
3. Set-based statements end the others' sessions (reason ``idle_timeout``), journal one
   ``expired`` audit row per ended session (one per user without an open session), and mark the
   users disconnected with a bumped ``version``.

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.transactions import in_transaction

from storage.activity import ACTIVITY_KEY, AccessLog, ActivityBuffer
from storage.cache import Cache, user_key, version_key
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
    RETURNING s.user_id, s.session_id
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
SELECT (SELECT count(*) FROM ended) AS sessions, (SELECT count(*) FROM journal) AS journaled
"""

_DISCONNECT = """
UPDATE users
SET status = $3, disconnected_at = $2, version = version + 1, updated_at = now()
WHERE id = ANY($1::text[])
RETURNING id, version
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
    flushed: dict[str, Any] | None = None
    users: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _pending(buffer: ActivityBuffer, user_ids: Sequence[str]) -> dict[str, float]:
    """Buffered activity (epoch seconds) of these users, from the live hash."""
    values = await buffer.client.hmget(ACTIVITY_KEY, list(user_ids))
    return {uid: float(raw) for uid, raw in zip(user_ids, values, strict=True) if raw is not None}


# Eviction of many users in one call, with the version guard of ``Cache.sync``: KEYS are
# (user key, version key) pairs, ARGV the cache TTL then one new version per user.
_EVICT_MANY = """
local ttl = tonumber(ARGV[1]) * 2
local done = 0
for i = 1, #KEYS, 2 do
  local v = ARGV[(i + 1) / 2 + 1]
  local cur = tonumber(redis.call('GET', KEYS[i + 1]) or '-1')
  if tonumber(v) >= cur then
    redis.call('SET', KEYS[i + 1], v, 'EX', ttl)
    redis.call('DEL', KEYS[i])
    done = done + 1
  end
end
return done
"""
EVICT_CHUNK = 1000  # keeps each script run to a few milliseconds of Redis time


async def _evict(cache: Cache, expired: Sequence[dict[str, Any]]) -> int:
    """Evicts ``user:<id>`` of the expired users unless a newer version is cached already."""
    script = cache.client.register_script(_EVICT_MANY)
    done = 0
    for start in range(0, len(expired), EVICT_CHUNK):
        keys: list[str] = []
        args: list[int] = [cache.ttl_s]
        for row in expired[start : start + EVICT_CHUNK]:
            uid = str(row["id"])
            keys += [user_key(uid), version_key(uid)]
            args.append(int(row["version"]))
        done += int(await script(keys=keys, args=args))
    return done


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
) -> SweepResult:
    """One sweep at ``now`` (injectable); ``dry_run`` only reports who would be expired."""
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
