"""Buffers in Redis for what happens on every request: activity and access decisions.

The API writes here with O(1) work per request and never touches PostgreSQL; the flush job moves
both buffers to PostgreSQL in batches (CONTRACT §2, §5), serialised by one Redis lock:
- activity entries stay in the live hash until PostgreSQL and the cache have them, and are then
  deleted only if no newer request replaced them (``storage.flush``), so no reader ever misses one;
- the access log (``AccessLog``) is a capped list read and trimmed page by page: a flush holds one
  page in memory whatever the backlog, and a crash between a page's insert and its trim journals
  that one page twice, never loses it. Past the caps (entries and bytes) entries are counted in
  ``audit:access:overflow`` instead of stored, and the count is journaled (``access_log_overflow``);
- refused tokens (401) are not one entry each: ``audit:refused`` counts them per (minute, route,
  reason, client address), and the flush journals one row per closed minute and key.

This module is the one writer and the one reader of those formats. Their key names, one of
each on a single Redis and ``storage.keys.SHARDS`` shards on a Redis Cluster (so that no master
carries all of it), are ``storage.keys``': a user's activity goes to the shard of
``crc32(user_id)``, each push of access decisions to the next shard in turn; the caps are divided
among the shards. The flush drains every shard.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, cast

from sessiond.config import Settings
from storage.keys import SINGLE, AccessShard
from storage.redis_conn import AsyncClient, AsyncPipeline, layout, run_script

# The single-Redis names (``storage.keys``); a cluster shards each of them.
ACTIVITY_KEY = SINGLE.activity_keys[0]
ACCESS_LOG_KEY = SINGLE.access_shards[0].entries
ACCESS_LOG_BYTES_KEY = SINGLE.access_shards[0].nbytes
ACCESS_LOG_OVERFLOW_KEY = SINGLE.access_shards[0].overflow
REFUSED_KEY = SINGLE.access_shards[0].refused
# Left by flushes of an earlier version (the list was renamed aside whole): drained first.
ACCESS_LOG_DRAINING_KEY = "audit:access:draining"
REFUSED_DECISION: Final = "invalid_token"
OTHER_CLIENTS: Final = "*"
"""The client address of refused tokens once ``audit:refused`` holds its cap of keys."""
MINUTE_GRACE_S: Final = 5.0
"""A minute's refused count is journaled this long after the minute ends: the API pushes its
counts every fraction of a second, so by then the minute is complete."""

# KEYS: list, bytes counter, overflow hash. ARGV: max entries, max bytes, entries...
# Stores what fits under both caps, counts the rest; returns how many were not stored.
_APPEND = """
local n = redis.call('LLEN', KEYS[1])
local size = tonumber(redis.call('GET', KEYS[2]) or '0')
local max_n, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[2])
local last, added = 2, 0
for i = 3, #ARGV do
  local len = #ARGV[i]
  if n + 1 > max_n or size + len > max_bytes then break end
  n, size, last, added = n + 1, size + len, i, added + len
end
for i = 3, last, 500 do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 499, last)))
end
if added > 0 then redis.call('INCRBY', KEYS[2], added) end
local dropped = #ARGV - last
if dropped > 0 then redis.call('HINCRBY', KEYS[3], 'redis', dropped) end
return dropped
"""

# KEYS: list, bytes counter (or the list twice). ARGV: entries read, their bytes.
_TRIM = """
redis.call('LTRIM', KEYS[1], tonumber(ARGV[1]), -1)
if KEYS[2] ~= KEYS[1] then
  local left = redis.call('DECRBY', KEYS[2], tonumber(ARGV[2]))
  if left < 0 or redis.call('EXISTS', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) end
end
return 1
"""

# KEYS: hash, ARGV: max fields, then (field, overflow field, count) triples. A new field past the
# cap is counted under its overflow field (same minute, route and reason; any client).
_COUNT = """
local max_fields = tonumber(ARGV[1])
for i = 2, #ARGV, 3 do
  local field = ARGV[i]
  if redis.call('HEXISTS', KEYS[1], field) == 0 and redis.call('HLEN', KEYS[1]) >= max_fields then
    field = ARGV[i + 1]
  end
  redis.call('HINCRBY', KEYS[1], field, tonumber(ARGV[i + 2]))
end
return 1
"""

# KEYS: hash. ARGV: (field, journaled count) pairs. Takes away exactly what was journaled, so a
# count that grew meanwhile keeps its remainder for the next flush.
_UNCOUNT = """
for i = 1, #ARGV, 2 do
  if redis.call('HINCRBY', KEYS[1], ARGV[i], -tonumber(ARGV[i + 1])) <= 0 then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return 1
"""

# KEYS: hash key. ARGV: user id, epoch seconds. Keeps the newest time (never moves backwards).
_TOUCH = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""


def _now() -> float:
    return datetime.now(UTC).timestamp()


class ActivityBuffer:
    """``activity`` hash: user id → epoch seconds of the newest granted request."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.layout = layout(client)
        self._touch = client.register_script(_TOUCH)

    @property
    def keys(self) -> tuple[str, ...]:
        """Every shard's hash (one on a single Redis), for the flush."""
        return self.layout.activity_keys

    async def touch(self, user_id: str, at: float | None = None) -> None:
        key = self.layout.activity_key(user_id)
        await self._touch(keys=[key], args=[user_id, at if at is not None else _now()])

    async def queue_touches(
        self, pipe: AsyncPipeline, touches: Iterable[tuple[str, float]]
    ) -> None:
        """Queues many touches on a caller's pipeline: one round trip for a whole batch."""
        for user_id, at in touches:
            await run_script(self._touch, [self.layout.activity_key(user_id)], [user_id, at], pipe)

    async def pending(self, user_id: str) -> datetime | None:
        """The newest activity not yet flushed to PostgreSQL."""
        raw = await self.client.hget(self.layout.activity_key(user_id), user_id)
        return datetime.fromtimestamp(float(raw), tz=UTC) if raw else None


RefusedKey = tuple[int, str, str, str]
"""(minute as epoch seconds, route, reason, client address) of refused tokens."""


def iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC).isoformat()


@dataclass(slots=True)
class Page:
    """One page of the access log as read: where from, how many entries, their bytes."""

    key: str
    counter: str  # the byte count it is taken off (the list itself for a leftover draining key)
    entries: list[dict[str, Any]]
    count: int
    nbytes: int


class AccessLog:
    """``audit:access`` list of JSON access decisions (granted, forbidden), capped in entries and
    bytes, with the refused-token counts and the overflow counts beside it."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        max_entries: int = 1_000_000,
        max_bytes: int = 256 * 2**20,
        max_refused_keys: int = 100_000,
    ) -> None:
        self.client = client
        self.shards = layout(client).access_shards
        # The caps hold for all shards together: each shard gets its part.
        n = len(self.shards)
        self.max_entries = max(1, max_entries // n)
        self.max_bytes = max(1, max_bytes // n)
        self.max_refused_keys = max(1, max_refused_keys // n)
        self._turn = zlib.crc32(f"{os.getpid()}:{id(self)}".encode()) % n
        self._append = client.register_script(_APPEND)
        self._trim = client.register_script(_TRIM)
        self._count = client.register_script(_COUNT)
        self._uncount = client.register_script(_UNCOUNT)
        self._tails: dict[tuple[str | None, str | None, str, str | None, str], str] = {}

    @classmethod
    def configured(cls, client: AsyncClient, settings: Settings) -> AccessLog:
        return cls(
            client,
            max_entries=settings.access_log_max_entries,
            max_bytes=settings.access_log_max_bytes,
            max_refused_keys=settings.access_refused_max_keys,
        )

    # ------------------------------------------------------------------ writing (the API)

    def encode(
        self,
        at: float,
        user_id: str | None,
        session_id: str | None,
        decision: str,
        reason: str | None,
        route: str,
    ) -> str:
        """``{"at", "user_id", "session_id", "decision", "reason", "route"}`` as compact JSON;
        all but the time repeat a lot, so their encoding is remembered."""
        tail_key = (user_id, session_id, decision, reason, route)
        tail = self._tails.get(tail_key)
        if tail is None:
            tail = json.dumps(
                {
                    "user_id": user_id,
                    "session_id": session_id,
                    "decision": decision,
                    "reason": reason,
                    "route": route,
                },
                separators=(",", ":"),
            )[1:]
            if len(self._tails) >= 10_000:
                self._tails.clear()
            self._tails[tail_key] = tail
        return f'{{"at":"{iso(at)}",{tail}'

    def _next(self) -> AccessShard:
        """The shard of the next push: each in turn, so every master gets its share."""
        self._turn = (self._turn + 1) % len(self.shards)
        return self.shards[self._turn]

    async def queue_append(
        self, pipe: AsyncPipeline, encoded: Sequence[str], *, chunk: int = 2000
    ) -> int:
        """Queues capped appends of encoded entries on a pipeline; returns how many commands were
        queued (each answers how many of its entries were over the caps, already counted)."""
        calls = 0
        shard = self._next()
        for start in range(0, len(encoded), chunk):
            args: list[str | int] = [
                self.max_entries,
                self.max_bytes,
                *encoded[start : start + chunk],
            ]
            keys = [shard.entries, shard.nbytes, shard.overflow]
            await run_script(self._append, keys, args, pipe)
            calls += 1
        return calls

    async def append(self, encoded: Sequence[str]) -> int:
        """Capped append outside a pipeline; returns how many entries were over the caps."""
        async with self.client.pipeline(transaction=False) as pipe:
            await self.queue_append(pipe, encoded)
            return sum(int(n) for n in await pipe.execute())

    async def record(self, entry: dict[str, Any]) -> int:
        """One entry given as a dict (tools and tests): capped like the API's batches."""
        return await self.append([json.dumps(entry, separators=(",", ":"))])

    async def queue_refused(self, pipe: AsyncPipeline, counts: dict[RefusedKey, int]) -> None:
        """Queues the refused-token counts, capped in keys (past the cap: client ``*``)."""
        args: list[str | int] = [self.max_refused_keys]
        for (minute, route, reason, client_address), n in counts.items():
            args += [
                json.dumps([minute, route, reason, client_address], separators=(",", ":")),
                json.dumps([minute, route, reason, OTHER_CLIENTS], separators=(",", ":")),
                n,
            ]
        if counts:
            await run_script(self._count, [self._next().refused], args, pipe)

    def queue_overflow(self, pipe: AsyncPipeline, buffer: str, n: int) -> None:
        """Counts ``n`` entries that a buffer (``api``: a process while Redis was down) dropped."""
        pipe.hincrby(self._next().overflow, buffer, n)

    @property
    def _lists(self) -> list[tuple[str, str]]:
        """``(list, byte counter)`` of every shard, after a leftover draining key (single Redis
        only: an earlier version's)."""
        lists = [(s.entries, s.nbytes) for s in self.shards]
        if len(self.shards) == 1:
            lists.insert(0, (ACCESS_LOG_DRAINING_KEY, ACCESS_LOG_DRAINING_KEY))
        return lists

    # ------------------------------------------------------------------ reading (the flush)

    async def backlog(self) -> int:
        """Entries waiting (live list and a leftover draining key)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for key, _ in self._lists:
                pipe.llen(key)
            return sum(int(n) for n in await pipe.execute())

    async def read_page(self, size: int) -> Page | None:
        """The oldest ``size`` entries, left in place until ``ack``: a leftover draining key of an
        earlier version first, then the live list."""
        for key, counter in self._lists:
            raw = cast(list[bytes], await self.client.lrange(key, 0, size - 1))
            if raw:
                entries = []
                for item in raw:
                    try:
                        value = json.loads(item)
                    except ValueError:
                        continue  # not ours: trimmed with the page, never blocks the log
                    if isinstance(value, dict):
                        entries.append(value)
                return Page(key, counter, entries, len(raw), sum(len(r) for r in raw))
        return None

    async def ack(self, page: Page) -> None:
        """Trims a journaled page off the list's head (new entries only ever go to its tail)."""
        await self._trim(keys=[page.key, page.counter], args=[page.count, page.nbytes])

    async def closed_refused(
        self, now: float, *, limit: int = 10_000
    ) -> list[tuple[str, str, RefusedKey, int]]:
        """Refused-token counts of minutes that ended (``MINUTE_GRACE_S`` ago), at most ``limit``,
        from every shard: ``(hash, field, key, count)``; one key may come from several shards."""
        closed: list[tuple[str, str, RefusedKey, int]] = []
        for shard in self.shards:
            cursor = 0
            while len(closed) < limit:
                cursor, page = await self.client.hscan(shard.refused, cursor, count=1000)
                for field, value in cast(dict[bytes, bytes], page).items():
                    try:
                        minute, route, reason, client_address = json.loads(field)
                    except ValueError:
                        continue
                    if minute + 60 + MINUTE_GRACE_S <= now and len(closed) < limit:
                        key = (int(minute), str(route), str(reason), str(client_address))
                        closed.append((shard.refused, field.decode(), key, int(value)))
                if cursor == 0:
                    break
        return closed

    async def ack_refused(self, journaled: Sequence[tuple[str, str, int]]) -> None:
        """Takes ``(hash, field, count)`` away, as journaled."""
        by_hash: dict[str, list[str | int]] = {}
        for hash_key, field, n in journaled:
            by_hash.setdefault(hash_key, []).extend([field, n])
        for hash_key, args in by_hash.items():
            for start in range(0, len(args), 2000):
                await self._uncount(keys=[hash_key], args=args[start : start + 2000])

    async def overflow(self) -> list[tuple[str, str, int]]:
        """Entries counted instead of stored, not yet journaled: ``(hash, buffer, count)`` per
        shard and buffer (``redis``, ``api``)."""
        out: list[tuple[str, str, int]] = []
        for shard in self.shards:
            raw = cast(dict[bytes, bytes], await self.client.hgetall(shard.overflow))
            out += [(shard.overflow, k.decode(), int(v)) for k, v in raw.items() if int(v) > 0]
        return out

    async def ack_overflow(self, journaled: Sequence[tuple[str, str, int]]) -> None:
        by_hash: dict[str, list[str | int]] = {}
        for hash_key, buffer, n in journaled:
            by_hash.setdefault(hash_key, []).extend([buffer, n])
        for hash_key, args in by_hash.items():
            await self._uncount(keys=[hash_key], args=args)
