"""The activity flush: what the API buffered in Redis reaches PostgreSQL in set-based batches.

Activity (``ActivityBuffer``: a hash of the newest request time per user, one per session;
each sharded on a cluster, every shard in turn):
- one ``UPDATE … FROM unnest(…)`` per page of a hash moves the times forward: the users'
  ``last_activity_at`` and ``seen_at``, the open sessions' ``last_seen_at``. A timestamp never
  goes backwards and a replayed page is a no-op. Each hash keeps one entry per user or session,
  so 10,000 requests of one session between two flushes are one row update of the user and one
  of the session. ``users.version`` is left alone: activity is not a state change. Session rows
  are locked in id order, as every unit of work locks them, so a flush never deadlocks one;
- then the cached ``user:<id>`` snapshots get the same times (compare-and-set, same version), so
  the API's idle check, which reads the cache and the live hashes, keeps seeing the activity;
- only then is each entry deleted, and only if it still holds the flushed value: a request that
  arrived during the flush keeps its newer entry. A crash at any point leaves the entries for the
  next flush. Entries are never moved aside, so no reader can miss one in flight.

Then the access decisions (``storage.access_flush``).

Flushes and expiry sweeps take one Redis lock (``lock:activity``) so that they never overlap: no
two flushes write the same rows at once, and a sweep's own flush is the only one while it runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from redis.asyncio.lock import Lock
from redis.exceptions import LockError
from tortoise.backends.base.client import BaseDBAsyncClient

from storage.access_flush import drain_access_log
from storage.activity import AccessLog, ActivityBuffer
from storage.cache import user_key
from storage.db import conn
from storage.keys import parse_session_field
from storage.redis_conn import AsyncClient, by_slot, mget, run_each

log = logging.getLogger(__name__)

BATCH_SIZE = 10_000
ACTIVITY_LOCK_KEY = "lock:activity"
LOCK_TTL_S = 60.0

CAS_ATTEMPTS = 3
CACHE_CHUNK = 1000  # users per script call: a few milliseconds of Redis time each

T = TypeVar("T")

# KEYS: user keys. ARGV: (value read, patched value) pairs. Compare-and-set keeping the TTL;
# returns the keys that changed meanwhile.
_PATCH_CACHE = """
local failed = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[2 * i - 1] then
    redis.call('SET', KEYS[i], ARGV[2 * i], 'KEEPTTL')
  else
    failed[#failed + 1] = KEYS[i]
  end
end
return failed
"""

# KEYS[1]: an activity hash. ARGV: (field, flushed value) pairs.
_FORGET = """
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return 1
"""

_UPDATE_ACTIVITY = """
WITH upd AS (
    UPDATE users u
    SET last_activity_at = GREATEST(u.last_activity_at, a.at),
        seen_at = GREATEST(u.seen_at, a.at)
    FROM unnest($1::text[], $2::timestamptz[]) AS a(id, at)
    WHERE u.id = a.id
      AND (u.last_activity_at IS NULL OR u.last_activity_at < a.at
           OR u.seen_at IS NULL OR u.seen_at < a.at)
    RETURNING 1
)
SELECT count(*) AS n FROM upd
"""

# Open sessions only (an ended one has nothing left to measure), locked in id order first.
_UPDATE_SESSIONS = """
WITH target AS (
    SELECT s.id, a.at
    FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS a(user_id, session_id, at)
    JOIN sessions s ON s.user_id = a.user_id AND s.session_id = a.session_id
    WHERE s.status = 'connected' AND (s.last_seen_at IS NULL OR s.last_seen_at < a.at)
    ORDER BY s.id
    FOR UPDATE OF s
), upd AS (
    UPDATE sessions s SET last_seen_at = GREATEST(s.last_seen_at, t.at)
    FROM target t
    WHERE s.id = t.id
    RETURNING 1
)
SELECT count(*) AS n FROM upd
"""


@dataclass(slots=True)
class FlushResult:
    """Counts of one flush; ``skipped`` when another flush or sweep held the lock."""

    activity_entries: int = 0
    users_updated: int = 0
    session_entries: int = 0
    sessions_updated: int = 0
    cache_refreshed: int = 0
    access_entries: int = 0
    access_pages: int = 0
    access_backlog: int = 0
    refused_rows: int = 0
    refused_count: int = 0
    overflow_count: int = 0
    batches: int = 0
    seconds: float = 0.0
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def activity_lock(client: AsyncClient, *, wait_s: float = 0.0) -> Lock:
    """The lock shared by flushes and sweeps; its TTL frees it when a holder dies."""
    return client.lock(
        ACTIVITY_LOCK_KEY,
        timeout=LOCK_TTL_S,
        sleep=0.05,
        blocking=wait_s > 0,
        blocking_timeout=wait_s if wait_s > 0 else None,
    )


async def release(lock: Lock) -> None:
    try:
        await lock.release()
    except LockError:  # expired and possibly taken by another holder: nothing of ours to free
        log.warning("activity lock expired before release", extra={"key": ACTIVITY_LOCK_KEY})


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def write_activity(
    db: BaseDBAsyncClient, entries: Sequence[tuple[str, datetime]], *, batch_size: int = BATCH_SIZE
) -> tuple[int, int]:
    """Moves the users' timestamps forward; returns (rows updated, statements run)."""
    updated = batches = 0
    # Sorted ids: concurrent writers lock rows in the same order.
    ordered = sorted(entries)
    for batch in chunks(ordered, batch_size):
        rows = await db.execute_query_dict(
            _UPDATE_ACTIVITY, [[uid for uid, _ in batch], [at for _, at in batch]]
        )
        updated += int(rows[0]["n"])
        batches += 1
    return updated, batches


async def write_session_activity(
    db: BaseDBAsyncClient,
    entries: Sequence[tuple[str, str, datetime]],
    *,
    batch_size: int = BATCH_SIZE,
) -> tuple[int, int]:
    """Moves the open sessions' ``last_seen_at`` forward; returns (rows updated, statements)."""
    updated = batches = 0
    for batch in chunks(sorted(entries), batch_size):
        rows = await db.execute_query_dict(
            _UPDATE_SESSIONS,
            [[u for u, _, _ in batch], [s for _, s, _ in batch], [at for _, _, at in batch]],
        )
        updated += int(rows[0]["n"])
        batches += 1
    return updated, batches


@dataclass(slots=True)
class Patch:
    """What a page moves forward in one cached snapshot: the user's times, its sessions'."""

    at: datetime | None = None
    sessions: dict[str, datetime] = field(default_factory=dict)


async def drain_activity(
    buffer: ActivityBuffer, db: BaseDBAsyncClient, result: FlushResult, *, batch_size: int
) -> None:
    """Moves buffered activity into ``users``, ``sessions`` and the cached snapshots, page by
    page of each hash (every shard's users, then every shard's sessions).

    Entries stay in the live hashes until both are done, and are then deleted only if no newer
    request replaced them meanwhile. At every instant a request's time is in a live hash, or in
    PostgreSQL and the cache, so neither the API's idle check nor the sweep can miss it.
    """
    levels = [(key, True) for key in buffer.keys] + [(key, False) for key in buffer.session_keys]
    for key, of_users in levels:
        async for raw in _pages(buffer.client, key, batch_size):
            times = {k: datetime.fromtimestamp(float(v), tz=UTC) for k, v in raw.items()}
            patches: dict[str, Patch] = {}
            if of_users:
                updated, batches = await write_activity(
                    db, list(times.items()), batch_size=batch_size
                )
                patches = {uid: Patch(at=at) for uid, at in times.items()}
                result.activity_entries += len(times)
                result.users_updated += updated
            else:
                entries = [
                    (*pair, at) for f, at in times.items() if (pair := parse_session_field(f))
                ]
                updated, batches = await write_session_activity(db, entries, batch_size=batch_size)
                for uid, sid, at in entries:
                    patches.setdefault(uid, Patch()).sessions[sid] = at
                result.session_entries += len(times)
                result.sessions_updated += updated
            result.cache_refreshed += await refresh_cache(buffer.client, patches)
            await forget(buffer.client, raw, key=key)
            result.batches += batches


async def _pages(client: AsyncClient, key: str, batch_size: int) -> AsyncIterator[dict[str, bytes]]:
    """One hash, a page (``HSCAN``) at a time: field → raw value."""
    cursor = 0
    while True:
        cursor, reply = await client.hscan(key, cursor, count=batch_size)
        page = cast(dict[bytes, bytes], reply)  # the client does not decode responses
        if page:
            yield {k.decode(): v for k, v in page.items()}
        if cursor == 0:
            return


async def refresh_cache(client: AsyncClient, patches: dict[str, Patch]) -> int:
    """Moves ``seen_at``/``last_activity_at`` and the sessions' ``session_seen`` forward in the
    cached ``user:<id>`` snapshots.

    Activity is not a state change, so the version stays; each write is a compare-and-set on the
    value read, so a snapshot written meanwhile by a state change is never overwritten (it is
    read again and patched once more)."""
    script = client.register_script(_PATCH_CACHE)
    todo = list(patches)
    refreshed = 0
    for _ in range(CAS_ATTEMPTS):
        if not todo:
            break
        values = cast(list[bytes | None], await mget(client, [user_key(u) for u in todo]))
        writes: list[tuple[str, bytes, str]] = []
        for uid, raw in zip(todo, values, strict=True):
            patched = _patched(raw, patches[uid]) if raw is not None else None
            if raw is not None and patched is not None:
                writes.append((user_key(uid), raw, patched))
        calls: list[tuple[list[Any], list[Any]]] = []
        for group in by_slot(client, writes, lambda write: write[0]):  # one slot per call
            for chunk in chunks(group, CACHE_CHUNK):
                calls.append(([k for k, _, _ in chunk], [v for _, r, p in chunk for v in (r, p)]))
        missed: list[str] = []
        for (keys, _), failed in zip(calls, await run_each(client, script, calls), strict=True):
            refreshed += len(keys) - len(failed)
            missed += [k.decode().removeprefix("user:") for k in failed]
        todo = missed
    return refreshed


def _patched(raw: bytes, patch: Patch) -> str | None:
    """The cached JSON with the activity times applied, or ``None`` when none is newer. Only
    those fields are touched (``UserSnapshot.to_json``'s layout is kept), which keeps this cheap
    enough for a hundred thousand users a flush. Only sessions the entry holds open get a time:
    an ended one is not brought back."""
    try:
        data = json.loads(raw)
        changed = False
        if patch.at is not None:
            for name in ("seen_at", "last_activity_at"):
                current = data.get(name)
                if current is None or datetime.fromisoformat(current) < patch.at:
                    data[name] = patch.at.isoformat()
                    changed = True
        seen = data.get("session_seen")
        for sid, at in patch.sessions.items() if isinstance(seen, dict) else ():
            if sid in seen and datetime.fromisoformat(seen[sid]) < at:
                seen[sid] = at.isoformat()
                changed = True
    except (TypeError, ValueError, AttributeError):
        return None
    return json.dumps(data, separators=(",", ":")) if changed else None


async def forget(client: AsyncClient, flushed: dict[str, bytes], *, key: str) -> None:
    """Deletes flushed entries of the hash ``key`` that still hold the flushed value (a newer
    request keeps its own)."""
    script = client.register_script(_FORGET)
    items = list(flushed.items())
    for start in range(0, len(items), CACHE_CHUNK):
        args: list[bytes | str] = []
        for uid, value in items[start : start + CACHE_CHUNK]:
            args += [uid, value]
        await script(keys=[key], args=args)


async def flush_pending(
    buffer: ActivityBuffer,
    db: BaseDBAsyncClient,
    *,
    access_log: AccessLog | None = None,
    batch_size: int = BATCH_SIZE,
) -> FlushResult:
    """One flush; the caller holds the activity lock (see ``flush_activity``)."""
    started = time.perf_counter()
    result = FlushResult()
    await drain_activity(buffer, db, result, batch_size=batch_size)
    if access_log is not None:
        await drain_access_log(access_log, db, result, batch_size=batch_size)
    result.seconds = round(time.perf_counter() - started, 4)
    return result


async def flush_activity(
    buffer: ActivityBuffer,
    db: BaseDBAsyncClient | None = None,
    *,
    access_log: AccessLog | None = None,
    batch_size: int = BATCH_SIZE,
    lock_wait_s: float = 0.0,
) -> FlushResult:
    """Takes the activity lock (waiting up to ``lock_wait_s``), flushes, releases it.

    When the lock is busy the flush is skipped: the holder is a flush or a sweep that flushes too,
    and the scheduler's next tick comes within seconds.
    """
    lock = activity_lock(buffer.client, wait_s=lock_wait_s)
    if not await lock.acquire():
        return FlushResult(skipped=True)
    try:
        return await flush_pending(
            buffer, db or conn(), access_log=access_log, batch_size=batch_size
        )
    finally:
        await release(lock)
