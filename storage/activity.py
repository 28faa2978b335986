"""Buffers in Redis for what happens on every request: activity and access decisions.

The API writes here with O(1) work per request and never touches PostgreSQL; the flush job moves
both buffers to PostgreSQL in batches (CONTRACT §2, §5), serialised by one Redis lock:
- activity is kept at two levels, each a hash of the newest request time: per user (the user's
  ``seen_at``/``last_activity_at``) and per session (the session's ``last_seen_at``, which the
  per-session idle timeout measures). A session entry's field is ``session_field``'s. Entries stay
  in the live hashes until PostgreSQL and the cache have them, and are then deleted only if no
  newer request replaced them (``storage.flush``), so no reader ever misses one;
- the access log (``AccessLog``) is a capped list read and trimmed page by page: a flush holds one
  page in memory whatever the backlog, and a crash between a page's insert and its trim journals
  that one page twice, never loses it. Past the caps (entries and bytes) entries are counted in
  ``audit:access:overflow`` instead of stored, and the count is journaled (``access_log_overflow``);
- refused tokens (401) are not one entry each: ``audit:refused`` counts them per (minute, route,
  reason, client address), and the flush journals one row per closed minute and key.

This module is the one writer and the one reader of those formats.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from sessiond.config import Settings

ACCESS_LOG_KEY = "audit:access"
ACCESS_LOG_BYTES_KEY = "audit:access:bytes"
ACCESS_LOG_OVERFLOW_KEY = "audit:access:overflow"
REFUSED_KEY = "audit:refused"
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

# KEYS: hash key. ARGV: field, epoch seconds. Keeps the newest time (never moves backwards).
_TOUCH = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""

Level = Literal["user", "session"]
IMPLICIT_SESSION: Final = ""
"""The session of events and tokens without a session id (``storage.rows.IMPLICIT``)."""


def activity_key(level: Level) -> str:
    """The hash buffering one level of activity: ``activity`` (user id → epoch seconds) or
    ``activity:sessions`` (``session_field`` → epoch seconds). The one place the buffer's key
    names are built: spreading the buffer over several keys (Redis Cluster slots) changes this
    function and the loops over its keys, nothing else. Every script call touches one key."""
    return "activity" if level == "user" else "activity:sessions"


def session_field(user_id: str, session_id: str) -> str:
    """``<length of the user id>:<user id>:<session id>``: unambiguous whatever either holds."""
    return f"{len(user_id)}:{user_id}:{session_id}"


def parse_session_field(field: str) -> tuple[str, str] | None:
    """``(user id, session id)`` of a ``session_field``; ``None`` for anything else."""
    size, sep, rest = field.partition(":")
    if not sep or not size.isdigit() or len(rest) <= int(size) or rest[int(size)] != ":":
        return None
    return rest[: int(size)], rest[int(size) + 1 :]


def _now() -> float:
    return datetime.now(UTC).timestamp()


def _when(raw: bytes | str | None) -> datetime | None:
    return datetime.fromtimestamp(float(raw), tz=UTC) if raw else None


class ActivityBuffer:
    """The activity hashes (``activity_key``): the epoch seconds of the newest granted request
    of each user and of each session."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._touch = client.register_script(_TOUCH)

    async def touch(
        self, user_id: str, at: float | None = None, *, session_id: str | None = None
    ) -> None:
        """Activity of a user's session (``None``: the implicit one), at both levels."""
        when = at if at is not None else _now()
        async with self.client.pipeline(transaction=False) as pipe:
            sid = IMPLICIT_SESSION if session_id is None else session_id
            await self.queue_touches(pipe, [(user_id, when)], [(user_id, sid, when)])
            await pipe.execute()

    async def queue_touches(
        self,
        pipe: Pipeline,
        users: Iterable[tuple[str, float]],
        sessions: Iterable[tuple[str, str, float]] = (),
    ) -> None:
        """Queues many touches on a caller's pipeline: one round trip for a whole batch."""
        for user_id, at in users:
            await self._touch(keys=[activity_key("user")], args=[user_id, at], client=pipe)
        for user_id, session_id, at in sessions:
            field = session_field(user_id, session_id)
            await self._touch(keys=[activity_key("session")], args=[field, at], client=pipe)

    async def pending(self, user_id: str, session_id: str | None = None) -> datetime | None:
        """The newest activity not yet flushed to PostgreSQL: the user's, or one session's."""
        if session_id is None:
            return _when(await self.client.hget(activity_key("user"), user_id))
        field = session_field(user_id, session_id)
        return _when(await self.client.hget(activity_key("session"), field))

    async def pending_users(self, user_ids: Sequence[str]) -> dict[str, float]:
        """Buffered activity (epoch seconds) of these users: one ``HMGET``."""
        if not user_ids:
            return {}
        values = await self.client.hmget(activity_key("user"), list(user_ids))
        return {u: float(v) for u, v in zip(user_ids, values, strict=True) if v is not None}

    async def pending_sessions(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], float]:
        """Buffered activity (epoch seconds) of these (user, session) pairs: one ``HMGET``."""
        if not pairs:
            return {}
        fields = [session_field(u, s) for u, s in pairs]
        values = await self.client.hmget(activity_key("session"), fields)
        return {p: float(v) for p, v in zip(pairs, values, strict=True) if v is not None}


RefusedKey = tuple[int, str, str, str]
"""(minute as epoch seconds, route, reason, client address) of refused tokens."""


def iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC).isoformat()


@dataclass(slots=True)
class Page:
    """One page of the access log as read: where from, how many entries, their bytes."""

    key: str
    entries: list[dict[str, Any]]
    count: int
    nbytes: int


class AccessLog:
    """``audit:access`` list of JSON access decisions (granted, forbidden), capped in entries and
    bytes, with the refused-token counts and the overflow counts beside it."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        max_entries: int = 1_000_000,
        max_bytes: int = 256 * 2**20,
        max_refused_keys: int = 100_000,
    ) -> None:
        self.client = client
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_refused_keys = max_refused_keys
        self._append = client.register_script(_APPEND)
        self._trim = client.register_script(_TRIM)
        self._count = client.register_script(_COUNT)
        self._uncount = client.register_script(_UNCOUNT)
        self._tails: dict[tuple[str | None, str | None, str, str | None, str], str] = {}

    @classmethod
    def configured(cls, client: aioredis.Redis, settings: Settings) -> AccessLog:
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

    async def queue_append(
        self, pipe: Pipeline, encoded: Sequence[str], *, chunk: int = 2000
    ) -> int:
        """Queues capped appends of encoded entries on a pipeline; returns how many commands were
        queued (each answers how many of its entries were over the caps, already counted)."""
        calls = 0
        for start in range(0, len(encoded), chunk):
            args: list[str | int] = [
                self.max_entries,
                self.max_bytes,
                *encoded[start : start + chunk],
            ]
            keys = [ACCESS_LOG_KEY, ACCESS_LOG_BYTES_KEY, ACCESS_LOG_OVERFLOW_KEY]
            await self._append(keys=keys, args=args, client=pipe)
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

    async def queue_refused(self, pipe: Pipeline, counts: dict[RefusedKey, int]) -> None:
        """Queues the refused-token counts, capped in keys (past the cap: client ``*``)."""
        args: list[str | int] = [self.max_refused_keys]
        for (minute, route, reason, client_address), n in counts.items():
            args += [
                json.dumps([minute, route, reason, client_address], separators=(",", ":")),
                json.dumps([minute, route, reason, OTHER_CLIENTS], separators=(",", ":")),
                n,
            ]
        if counts:
            await self._count(keys=[REFUSED_KEY], args=args, client=pipe)

    def queue_overflow(self, pipe: Pipeline, buffer: str, n: int) -> None:
        """Counts ``n`` entries that a buffer (``api``: a process while Redis was down) dropped."""
        pipe.hincrby(ACCESS_LOG_OVERFLOW_KEY, buffer, n)

    # ------------------------------------------------------------------ reading (the flush)

    async def backlog(self) -> int:
        """Entries waiting (live list and a leftover draining key)."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.llen(ACCESS_LOG_KEY)
            pipe.llen(ACCESS_LOG_DRAINING_KEY)
            return sum(int(n) for n in await pipe.execute())

    async def read_page(self, size: int) -> Page | None:
        """The oldest ``size`` entries, left in place until ``ack``: a leftover draining key of an
        earlier version first, then the live list."""
        for key in (ACCESS_LOG_DRAINING_KEY, ACCESS_LOG_KEY):
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
                return Page(key, entries, len(raw), sum(len(r) for r in raw))
        return None

    async def ack(self, page: Page) -> None:
        """Trims a journaled page off the list's head (new entries only ever go to its tail)."""
        counter = ACCESS_LOG_BYTES_KEY if page.key == ACCESS_LOG_KEY else page.key
        await self._trim(keys=[page.key, counter], args=[page.count, page.nbytes])

    async def closed_refused(
        self, now: float, *, limit: int = 10_000
    ) -> list[tuple[str, RefusedKey, int]]:
        """Refused-token counts of minutes that ended (``MINUTE_GRACE_S`` ago), at most ``limit``:
        ``(field, key, count)``."""
        closed: list[tuple[str, RefusedKey, int]] = []
        cursor = 0
        while len(closed) < limit:
            cursor, page = await self.client.hscan(REFUSED_KEY, cursor, count=1000)
            for field, value in cast(dict[bytes, bytes], page).items():
                try:
                    minute, route, reason, client_address = json.loads(field)
                except ValueError:
                    continue
                if minute + 60 + MINUTE_GRACE_S <= now and len(closed) < limit:
                    key = (int(minute), str(route), str(reason), str(client_address))
                    closed.append((field.decode(), key, int(value)))
            if cursor == 0:
                break
        return closed

    async def ack_refused(self, journaled: Sequence[tuple[str, int]]) -> None:
        for start in range(0, len(journaled), 1000):
            args: list[str | int] = []
            for field, n in journaled[start : start + 1000]:
                args += [field, n]
            await self._uncount(keys=[REFUSED_KEY], args=args)

    async def overflow(self) -> dict[str, int]:
        """Entries counted instead of stored, by buffer (``redis``, ``api``), not yet journaled."""
        raw = cast(dict[bytes, bytes], await self.client.hgetall(ACCESS_LOG_OVERFLOW_KEY))
        return {k.decode(): int(v) for k, v in raw.items() if int(v) > 0}

    async def ack_overflow(self, journaled: dict[str, int]) -> None:
        if journaled:
            args: list[str | int] = []
            for buffer, n in journaled.items():
                args += [buffer, n]
            await self._uncount(keys=[ACCESS_LOG_OVERFLOW_KEY], args=args)
