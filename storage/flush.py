"""The activity flush: what the API buffered in Redis reaches PostgreSQL in set-based batches.

Activity (``ActivityBuffer``, the ``activity`` hash, sharded on a cluster: user id → newest
request time; every shard in turn):
- one ``UPDATE … FROM unnest(…)`` per page of the hash moves ``last_activity_at`` and ``seen_at``
  forward with ``GREATEST``: a timestamp never goes backwards and a replayed page is a no-op. The
  hash keeps one entry per user, so 10,000 requests by one user between two flushes are one row
  update. ``users.version`` is left alone: activity is not a state change;
- then the cached ``user:<id>`` snapshots get the same times (compare-and-set, same version), so
  the API's idle check, which reads the cache and the live hash, keeps seeing the activity;
- only then is each entry deleted, and only if it still holds the flushed value: a request that
  arrived during the flush keeps its newer entry. A crash at any point leaves the entries for the
  next flush. Entries are never moved aside, so no reader can miss one in flight.

Access decisions (``AccessLog``): the oldest page of the list is read, journaled into
``audit_events`` with one multi-row ``INSERT``, and trimmed off after the commit (a crash in
between journals that one page twice on the next flush, never loses it). Memory is one page,
whatever the backlog; one flush drains for at most ``DRAIN_BUDGET_S`` so that it stays well inside
the lock's TTL, and the next tick goes on. Then the refused-token counts of closed minutes and the
overflow counts are journaled, each taken away only by what was written.

Flushes and expiry sweeps take one Redis lock (``lock:activity``) so that they never overlap: no
two flushes write the same rows at once, and a sweep's own flush is the only one while it runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from redis.asyncio.lock import Lock
from redis.exceptions import LockError
from tortoise.backends.base.client import BaseDBAsyncClient

from storage.activity import (
    REFUSED_DECISION,
    AccessLog,
    ActivityBuffer,
    RefusedKey,
)
from storage.cache import user_key
from storage.db import conn
from storage.journal import write_audit
from storage.redis_conn import AsyncClient, by_slot, mget, run_each

log = logging.getLogger(__name__)

ACCESS_KIND = "access"
OVERFLOW_KIND = "access_log_overflow"

BATCH_SIZE = 10_000
ACTIVITY_LOCK_KEY = "lock:activity"
LOCK_TTL_S = 60.0
DRAIN_BUDGET_S = 20.0

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

# KEYS[1]: the activity hash. ARGV: (user id, flushed value) pairs.
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


@dataclass(slots=True)
class FlushResult:
    """Counts of one flush; ``skipped`` when another flush or sweep held the lock."""

    activity_entries: int = 0
    users_updated: int = 0
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


async def drain_activity(
    buffer: ActivityBuffer, db: BaseDBAsyncClient, result: FlushResult, *, batch_size: int
) -> None:
    """Moves buffered activity into ``users`` and the cached snapshots, page by page.

    Entries stay in the live hash until both are done, and are then deleted only if no newer
    request replaced them meanwhile. At every instant a request's time is in the live hash, or in
    PostgreSQL and the cache, so neither the API's idle check nor the sweep can miss it.
    """
    client = buffer.client
    for key in buffer.keys:  # every shard
        cursor = 0
        while True:
            cursor, reply = await client.hscan(key, cursor, count=batch_size)
            page = cast(dict[bytes, bytes], reply)  # the client does not decode responses
            if page:
                raw = {k.decode(): v for k, v in page.items()}
                entries = {uid: datetime.fromtimestamp(float(v), tz=UTC) for uid, v in raw.items()}
                updated, batches = await write_activity(
                    db, list(entries.items()), batch_size=batch_size
                )
                result.cache_refreshed += await refresh_cache(client, entries)
                await forget(client, raw, key=key)
                result.activity_entries += len(entries)
                result.users_updated += updated
                result.batches += batches
            if cursor == 0:
                break


async def refresh_cache(client: AsyncClient, entries: dict[str, datetime]) -> int:
    """Moves ``seen_at``/``last_activity_at`` forward in the cached ``user:<id>`` snapshots.

    Activity is not a state change, so the version stays; each write is a compare-and-set on the
    value read, so a snapshot written meanwhile by a state change is never overwritten (it is
    read again and patched once more)."""
    script = client.register_script(_PATCH_CACHE)
    todo = list(entries)
    refreshed = 0
    for _ in range(CAS_ATTEMPTS):
        if not todo:
            break
        values = cast(list[bytes | None], await mget(client, [user_key(u) for u in todo]))
        patches: list[tuple[str, bytes, str]] = []
        for uid, raw in zip(todo, values, strict=True):
            patched = _patched(raw, entries[uid]) if raw is not None else None
            if raw is not None and patched is not None:
                patches.append((user_key(uid), raw, patched))
        calls: list[tuple[list[Any], list[Any]]] = []
        for group in by_slot(client, patches, lambda patch: patch[0]):  # one slot per call
            for chunk in chunks(group, CACHE_CHUNK):
                calls.append(([k for k, _, _ in chunk], [v for _, r, p in chunk for v in (r, p)]))
        missed: list[str] = []
        for (keys, _), failed in zip(calls, await run_each(client, script, calls), strict=True):
            refreshed += len(keys) - len(failed)
            missed += [k.decode().removeprefix("user:") for k in failed]
        todo = missed
    return refreshed


def _patched(raw: bytes, at: datetime) -> str | None:
    """The cached JSON with the activity time applied, or ``None`` when it is not older. Only the
    two fields are touched (``UserSnapshot.to_json``'s layout is kept), which keeps this cheap
    enough for a hundred thousand users a flush."""
    try:
        data = json.loads(raw)
        changed = False
        for name in ("seen_at", "last_activity_at"):
            current = data.get(name)
            if current is None or datetime.fromisoformat(current) < at:
                data[name] = at.isoformat()
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


def _when(value: Any) -> datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, tz=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _text(value: Any, limit: int) -> str | None:
    if value is None or value == "":
        return None
    return str(value)[:limit]


AuditRow = tuple[datetime | None, str | None, str | None, str, str | None, str, str]


def access_row(entry: dict[str, Any]) -> AuditRow:
    """One access decision as audit columns. Only known fields are kept: an entry never carries a
    token or a header into the journal (CONTRACT §5). Over-long values are cut to the column size
    so that one odd entry cannot block a whole batch."""
    detail: dict[str, Any] = {
        "decision": _text(entry.get("decision"), 32),
        "route": _text(entry.get("route"), 256),
    }
    if isinstance(entry.get("status"), int):
        detail["status"] = entry["status"]
    return (
        _when(entry.get("at")),
        _text(entry.get("user_id"), 128),
        _text(entry.get("session_id"), 128),
        ACCESS_KIND,
        _text(entry.get("reason"), 64),
        "api",
        json.dumps(detail, separators=(",", ":")),
    )


def refused_row(key: RefusedKey, count: int) -> AuditRow:
    """One row for all the refused tokens of one (minute, route, reason, client address)."""
    minute, route, reason, client_address = key
    detail = {
        "decision": REFUSED_DECISION,
        "route": route[:256],
        "client": client_address[:64] or None,
        "count": count,
    }
    at = datetime.fromtimestamp(minute, tz=UTC)
    return (at, None, None, ACCESS_KIND, reason[:64] or None, "api", json.dumps(detail))


async def drain_access_log(
    access_log: AccessLog,
    db: BaseDBAsyncClient,
    result: FlushResult,
    *,
    batch_size: int,
    budget_s: float = DRAIN_BUDGET_S,
    now: float | None = None,
) -> None:
    """Pages of ``batch_size`` entries, then the refused counts, then the overflow counts."""
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        page = await access_log.read_page(batch_size)
        if page is None:
            break
        await write_audit(db, [access_row(e) for e in page.entries])
        await access_log.ack(page)
        result.access_entries += len(page.entries)
        result.access_pages += 1
        result.batches += 1
    result.access_backlog = await access_log.backlog()
    closed = await access_log.closed_refused(time.time() if now is None else now)
    for start in range(0, len(closed), batch_size):
        part = closed[start : start + batch_size]
        counts: dict[RefusedKey, int] = {}
        for _, _, key, n in part:  # one row per key, whichever shards counted it
            counts[key] = counts.get(key, 0) + n
        await write_audit(db, [refused_row(key, n) for key, n in counts.items()])
        await access_log.ack_refused([(hash_key, field, n) for hash_key, field, _, n in part])
        result.refused_rows += len(counts)
        result.refused_count += sum(counts.values())
    overflow = await access_log.overflow()
    if overflow:
        dropped: dict[str, int] = {}
        for _, buffer, n in overflow:
            dropped[buffer] = dropped.get(buffer, 0) + n
        rows: list[AuditRow] = [
            (None, None, None, OVERFLOW_KIND, "cap", "api", json.dumps({"dropped": n, "buffer": b}))
            for b, n in sorted(dropped.items())
        ]
        await write_audit(db, rows)
        await access_log.ack_overflow(overflow)
        result.overflow_count += sum(dropped.values())
        log.warning("access log over its cap: entries counted, not stored", extra=dropped)


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
