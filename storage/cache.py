"""Redis: the ``user:<id>`` cache of active users and the activity buffer.

The cache is a projection of PostgreSQL. Every write carries the user's row version and a Lua
script refuses to replace a newer version with an older one, so a slow writer (a worker that
committed earlier, or an API process refilling after a miss) can never resurrect a revoked user.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from storage import redis_conn
from storage.keys import SINGLE, KeyLayout, user_key
from storage.redis_conn import AsyncClient, by_slot, mget, run_each, run_script

__all__ = ["gone_key", "user_key", "version_key"]


def version_key(user_id: str, layout: KeyLayout = SINGLE) -> str:
    return layout.version(user_id)


def gone_key(user_id: str, layout: KeyLayout = SINGLE) -> str:
    """Present (TTL as ``user:<id>``) while the newest change known to Redis disconnected the
    user: the API refuses such a user's tokens without asking PostgreSQL, so clients that keep
    calling with a logged-out token cost one Redis read each, not a database query."""
    return layout.gone(user_id)


@dataclass(frozen=True, slots=True)
class UserSnapshot:
    """What a cache hit must answer: is the user (and which sessions) connected, and since when."""

    user_id: str
    status: str
    version: int
    name: str | None = None
    email: str | None = None
    sessions: list[str] = field(default_factory=list)
    # Start time of each open session: the API refuses one older than ``SESSIOND_SESSION_MAX_S``.
    session_started: dict[str, datetime] = field(default_factory=dict)
    # Newest sign of life of each open session (login, or a request the flush moved here): the
    # API refuses one idle longer than the timeout (``SESSIOND_IDLE_SCOPE=session``).
    session_seen: dict[str, datetime] = field(default_factory=dict)
    connected_at: datetime | None = None
    seen_at: datetime | None = None
    last_activity_at: datetime | None = None
    # The user's newest "logged out everywhere": tokens issued before it are revoked (the fence).
    logged_out_at: datetime | None = None
    # Blocked (``storage.block``): the API answers 403 ``blocked`` instead of ``not_connected``.
    blocked: bool = False

    @property
    def connected(self) -> bool:
        return self.status == "connected"

    def to_json(self) -> str:
        # Built by hand: ``dataclasses.asdict`` deep-copies every field, on the pipeline's hot path.
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        data = {
            "user_id": self.user_id,
            "status": self.status,
            "version": self.version,
            "name": self.name,
            "email": self.email,
            "sessions": self.sessions,
            "session_started": {k: v.isoformat() for k, v in self.session_started.items()},
            "session_seen": {k: v.isoformat() for k, v in self.session_seen.items()},
            "connected_at": iso(self.connected_at),
            "seen_at": iso(self.seen_at),
            "last_activity_at": iso(self.last_activity_at),
            "logged_out_at": iso(self.logged_out_at),
            "blocked": self.blocked,
        }
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> UserSnapshot:
        data: dict[str, Any] = json.loads(raw)
        for key in ("connected_at", "seen_at", "last_activity_at", "logged_out_at"):
            if data.get(key):
                data[key] = datetime.fromisoformat(data[key])
        started = data.get("session_started") or {}  # absent in entries cached by 0.1.0
        data["session_started"] = {k: datetime.fromisoformat(v) for k, v in started.items()}
        seen = data.get("session_seen") or {}  # absent in entries cached before migration 0007
        data["session_seen"] = {k: datetime.fromisoformat(v) for k, v in seen.items()}
        return cls(**data)


# The one guard of every single-user write: a version older than the newest Redis has seen is
# refused, so a slow writer never puts back what a newer commit replaced. KEYS: user key, version
# key, gone key. ARGV: version, payload ("" = evict), ttl seconds. ``{refused}`` and
# ``{written}`` are what each caller wants back.
_GUARDED_WRITE = """
local cur = tonumber(redis.call('GET', KEYS[2]) or '-1')
local v = tonumber(ARGV[1])
if v < cur then return {refused} end
redis.call('SET', KEYS[2], ARGV[1], 'EX', tonumber(ARGV[3]) * 2)
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[3], ARGV[1], 'EX', tonumber(ARGV[3]))
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
  redis.call('DEL', KEYS[3])
end
return {written}
"""
# A writer after its commit: 1 when written, 0 when refused.
_SYNC = _GUARDED_WRITE.format(refused="0", written="1")


# The same guard for many users at once: KEYS are (user, version, gone) key triples; ARGV the
# TTL, the margin (0: evict up to the same version; 1: only older ones), whether the users are
# known to be disconnected (1: mark them gone; 0: unknown, forget any mark), then one version per
# user.
_EVICT_MANY = """
local ttl = tonumber(ARGV[1])
local margin = tonumber(ARGV[2])
local gone = ARGV[3] == '1'
local done = 0
for i = 1, #KEYS, 3 do
  local v = ARGV[(i + 2) / 3 + 3]
  local cur = tonumber(redis.call('GET', KEYS[i + 1]) or '-1')
  if tonumber(v) - margin >= cur then
    redis.call('SET', KEYS[i + 1], v, 'EX', ttl * 2)
    redis.call('DEL', KEYS[i])
    if gone then
      redis.call('SET', KEYS[i + 2], v, 'EX', ttl)
    else
      redis.call('DEL', KEYS[i + 2])
    end
    done = done + 1
  end
end
return done
"""
T = TypeVar("T")
EVICT_CHUNK = 1000  # keeps each script run to a few milliseconds of Redis time

# A refill after a miss (the API): a refusal answers the version Redis has seen, so the caller
# can tell a read that a newer commit overtook from a PostgreSQL that went backwards; -1 when
# written.
_REFILL = _GUARDED_WRITE.format(refused="cur", written="-1")

# The reconciler's comparison with PostgreSQL (``storage.reconcile``). KEYS: (user, version,
# gone) key triples; ARGV: the TTL, then per user its row version and whether it is connected.
# Older than the row: evicted (gone mark as the row says). At the row's version: left alone,
# unless the row is disconnected and an entry is there anyway. Newer than the row: not touched
# here, reported (position, cached version) for ``_RESET`` once PostgreSQL was read again.
# Returns {evicted, position, cached version, ...}.
_RECONCILE = """
local ttl = tonumber(ARGV[1])
local evicted = 0
local out = {0}
for i = 1, #KEYS, 3 do
  local n = (i + 2) / 3
  local v = tonumber(ARGV[2 * n])
  local connected = ARGV[2 * n + 1] == '1'
  local cur = tonumber(redis.call('GET', KEYS[i + 1]) or '-1')
  if cur < v then
    local was = redis.call('DEL', KEYS[i])
    redis.call('SET', KEYS[i + 1], v, 'EX', ttl * 2)
    if connected then
      was = was + redis.call('DEL', KEYS[i + 2])
    else
      redis.call('SET', KEYS[i + 2], v, 'EX', ttl)
    end
    if was > 0 then evicted = evicted + 1 end
  elseif cur == v then
    if not connected then evicted = evicted + redis.call('DEL', KEYS[i]) end
  else
    out[#out + 1] = n
    out[#out + 1] = cur
  end
end
out[1] = evicted
return out
"""

# Versions that went backwards (PostgreSQL restored or failed over): Redis has seen a version
# PostgreSQL no longer has. Compare-and-set on the cached version: only if Redis still holds
# the version that was found newer, the entry goes and the version drops to the row's (-1: no
# such user any more, every key goes). KEYS: key triples; ARGV: the TTL, then per user the
# cached version expected, the row version and whether it is connected. Returns how many reset.
_RESET = """
local ttl = tonumber(ARGV[1])
local done = 0
for i = 1, #KEYS, 3 do
  local n = (i + 2) / 3
  local expected = tonumber(ARGV[3 * n - 1])
  local v = tonumber(ARGV[3 * n])
  local cur = tonumber(redis.call('GET', KEYS[i + 1]) or '-1')
  if cur == expected then
    redis.call('DEL', KEYS[i])
    if v < 0 then
      redis.call('DEL', KEYS[i + 1], KEYS[i + 2])
    else
      redis.call('SET', KEYS[i + 1], v, 'EX', ttl * 2)
      if ARGV[3 * n + 1] == '1' then
        redis.call('DEL', KEYS[i + 2])
      else
        redis.call('SET', KEYS[i + 2], v, 'EX', ttl)
      end
    end
    done = done + 1
  end
end
return done
"""

# The reconciler's mark (``storage.reconcile``): KEYS[1]; ARGV the position and 1 to set it
# whatever it was (after a full comparison), 0 to only move it forward.
_MARK = """
local cur = redis.call('GET', KEYS[1])
if ARGV[2] == '1' or not cur or tonumber(cur) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


@dataclass(frozen=True, slots=True)
class RowState:
    """A user as PostgreSQL has it, for the reconciler; ``version`` -1: no such user."""

    user_id: str
    version: int
    connected: bool


@dataclass(frozen=True, slots=True)
class Ahead:
    """A cached entry whose version is newer than the row PostgreSQL answered with."""

    user_id: str
    cached: int


class Cache:
    """Thin typed wrapper so callers never build keys or scripts themselves."""

    def __init__(self, client: AsyncClient, *, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.layout = redis_conn.layout(client)
        self._sync = client.register_script(_SYNC)
        self._evict_many = client.register_script(_EVICT_MANY)
        self._refill = client.register_script(_REFILL)
        self._reconcile = client.register_script(_RECONCILE)
        self._reset = client.register_script(_RESET)
        self._mark = client.register_script(_MARK)

    async def sync(self, snapshot: UserSnapshot) -> bool:
        """Writes (connected) or evicts (otherwise) ``user:<id>``; False if a newer one is there."""
        return (await self.sync_many([snapshot]))[0]

    async def sync_many(self, snapshots: Sequence[UserSnapshot]) -> list[bool]:
        """``sync`` for a batch's users in one round trip (a pipeline of the guarded script)."""
        if not snapshots:
            return []
        pipe = self.client.pipeline(transaction=False)
        for snap in snapshots:
            payload = snap.to_json() if snap.connected else ""
            args = [snap.version, payload, self.ttl_s]
            await run_script(self._sync, self.keys(snap.user_id), args, pipe)
        return [bool(done) for done in await pipe.execute()]

    def keys(self, user_id: str) -> list[str]:
        """The user's key triple (entry, version, gone mark): one slot on a cluster."""
        return [user_key(user_id), self.layout.version(user_id), self.layout.gone(user_id)]

    def _chunks(self, items: Sequence[T], user_id: Callable[[T], str]) -> Iterator[Sequence[T]]:
        """Batches for the many-user scripts: ``EVICT_CHUNK`` users, each batch in one slot."""
        for group in by_slot(self.client, items, lambda item: user_key(user_id(item))):
            for start in range(0, len(group), EVICT_CHUNK):
                yield group[start : start + EVICT_CHUNK]

    async def evict_many(
        self, versions: Sequence[tuple[str, int]], *, disconnected: bool, older_only: bool = False
    ) -> int:
        """Evicts users in bulk with ``sync``'s version guard: a user whose newer version is
        cached meanwhile stays. ``disconnected``: the versions are disconnections (mark the users
        gone); otherwise their status is unknown and any gone mark is dropped too. ``older_only``
        also keeps an entry written at exactly that version (it is current). Returns how many
        were evicted."""
        calls: list[tuple[list[Any], list[Any]]] = []
        for chunk in self._chunks(versions, lambda item: item[0]):
            keys: list[str] = []
            args: list[int] = [self.ttl_s, 1 if older_only else 0, 1 if disconnected else 0]
            for user_id, version in chunk:
                keys += self.keys(user_id)
                args.append(version)
            calls.append((keys, args))
        return sum(int(n) for n in await run_each(self.client, self._evict_many, calls))

    async def refill(self, snapshot: UserSnapshot) -> int | None:
        """``sync`` for the API's refill after a miss: ``None`` when written, else the newer
        version Redis has seen (the caller's read is stale, or PostgreSQL went backwards)."""
        payload = snapshot.to_json() if snapshot.connected else ""
        keys = self.keys(snapshot.user_id)
        cur = int(await self._refill(keys=keys, args=[snapshot.version, payload, self.ttl_s]))
        return None if cur < 0 else cur

    async def reconcile(self, rows: Sequence[RowState]) -> tuple[int, list[Ahead]]:
        """Compares the cached versions with these rows (``_RECONCILE``): returns how many
        stale entries were evicted and the users whose cached version is newer than the row."""
        evicted, ahead = 0, []
        chunks = list(self._chunks(rows, lambda row: row.user_id))
        calls: list[tuple[list[Any], list[Any]]] = []
        for chunk in chunks:
            keys: list[str] = []
            args: list[int] = [self.ttl_s]
            for row in chunk:
                keys += self.keys(row.user_id)
                args += [row.version, 1 if row.connected else 0]
            calls.append((keys, args))
        for chunk, reply in zip(chunks, await run_each(self.client, self._reconcile, calls),
                                strict=True):  # fmt: skip
            out = [int(x) for x in reply]
            evicted += out[0]
            ahead += [
                Ahead(chunk[n - 1].user_id, cur)
                for n, cur in zip(out[1::2], out[2::2], strict=True)
            ]
        return evicted, ahead

    async def reset(self, found: Sequence[tuple[Ahead, RowState]]) -> int:
        """Brings entries newer than their row back to the row (``_RESET``), each only if Redis
        still holds the version that was found newer; returns how many were reset."""
        calls: list[tuple[list[Any], list[Any]]] = []
        for chunk in self._chunks(found, lambda pair: pair[1].user_id):
            keys: list[str] = []
            args: list[int] = [self.ttl_s]
            for ahead, row in chunk:
                keys += self.keys(row.user_id)
                args += [ahead.cached, row.version, 1 if row.connected else 0]
            calls.append((keys, args))
        return sum(int(n) for n in await run_each(self.client, self._reset, calls))

    async def mark(self, key: str, position: int, *, force: bool) -> None:
        """Moves the reconciler's mark forward (``force``: sets it, even backwards)."""
        await self._mark(keys=[key], args=[position, 1 if force else 0])

    async def is_gone(self, user_id: str) -> bool:
        """The newest change Redis saw disconnected the user (see ``gone_key``)."""
        return bool(await self.client.exists(self.layout.gone(user_id)))

    async def raw_many(self, user_ids: Sequence[str]) -> list[bytes | None]:
        """The cached ``user:<id>`` JSON of each user (``None``: a miss), in one ``MGET`` (one
        per slot on a cluster); the hot path parses it itself, once per distinct entry."""
        values = await mget(self.client, [user_key(user_id) for user_id in user_ids])
        return [v.encode() if isinstance(v, str) else v for v in values]

    async def get(self, user_id: str) -> UserSnapshot | None:
        raw = await self.client.get(user_key(user_id))
        return UserSnapshot.from_json(raw) if raw else None

    async def ping(self) -> bool:
        try:
            return await redis_conn.ping(self.client)
        except Exception:
            return False

    async def close(self) -> None:
        await self.client.aclose()
