"""Buffers in Redis for what happens on every request: activity and access decisions.

The API writes here with O(1) work per request and never touches PostgreSQL; the flush job drains
the buffers in batches (CONTRACT §2, §5). Draining renames the live key first, so requests that
arrive during a flush land in a fresh key and nothing is lost; a drained key that was not deleted
(a crash mid-flush) is picked up again by the next flush.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

ACTIVITY_KEY = "activity"
ACCESS_LOG_KEY = "audit:access"
DRAINING_PREFIX = "draining:"
# Leftover draining keys are found with SCAN, which walks the whole keyspace (a million cached
# users); large steps keep that to ~1,000 round trips instead of SCAN's default ~100,000.
SCAN_COUNT = 1000

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

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._touch = client.register_script(_TOUCH)

    async def touch(self, user_id: str, at: float | None = None) -> None:
        await self._touch(keys=[ACTIVITY_KEY], args=[user_id, at if at is not None else _now()])

    async def pending(self, user_id: str) -> datetime | None:
        """The newest activity not yet flushed (live key only; draining keys are seconds old)."""
        raw = await self.client.hget(ACTIVITY_KEY, user_id)
        return datetime.fromtimestamp(float(raw), tz=UTC) if raw else None

    async def pending_many(self, user_ids: Sequence[str]) -> dict[str, datetime]:
        """Pending activity for many users, draining keys included (the sweep must see them)."""
        if not user_ids:
            return {}
        keys = [
            ACTIVITY_KEY,
            *[
                k.decode()
                async for k in self.client.scan_iter(
                    f"{DRAINING_PREFIX}{ACTIVITY_KEY}:*", count=SCAN_COUNT
                )
            ],
        ]
        newest: dict[str, float] = {}
        for key in keys:
            values = await self.client.hmget(key, list(user_ids))
            for uid, raw in zip(user_ids, values, strict=True):
                if raw is not None:
                    newest[uid] = max(newest.get(uid, 0.0), float(raw))
        return {uid: datetime.fromtimestamp(ts, tz=UTC) for uid, ts in newest.items()}

    async def drain(self) -> tuple[str | None, dict[str, datetime]]:
        """Moves the live hash aside and returns (draining key, entries); ``ack`` deletes it."""
        key = await _claim(self.client, ACTIVITY_KEY)
        if key is None:
            return None, {}
        raw = await self.client.hgetall(key)
        return key, {_str(k): datetime.fromtimestamp(float(v), tz=UTC) for k, v in raw.items()}

    async def ack(self, key: str) -> None:
        await self.client.delete(key)


class AccessLog:
    """``audit:access`` list of JSON access decisions, journaled to ``audit_events`` in batches."""

    def __init__(self, client: aioredis.Redis, *, max_len: int = 1_000_000) -> None:
        self.client = client
        self.max_len = max_len

    async def record(self, entry: dict[str, Any]) -> None:
        await self.client.rpush(ACCESS_LOG_KEY, json.dumps(entry, separators=(",", ":")))

    async def drain(self) -> tuple[str | None, list[dict[str, Any]]]:
        key = await _claim(self.client, ACCESS_LOG_KEY)
        if key is None:
            return None, []
        raw = await self.client.lrange(key, 0, -1)
        return key, [json.loads(r) for r in raw]

    async def ack(self, key: str) -> None:
        await self.client.delete(key)


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _claim(client: aioredis.Redis, live: str) -> str | None:
    """A leftover draining key from a crashed flush first; else the live key renamed aside."""
    async for leftover in client.scan_iter(f"{DRAINING_PREFIX}{live}:*", count=SCAN_COUNT):
        return str(leftover.decode() if isinstance(leftover, bytes) else leftover)
    key = f"{DRAINING_PREFIX}{live}:{uuid.uuid4().hex}"
    try:
        await client.rename(live, key)
    except aioredis.ResponseError:  # "no such key": nothing to drain
        return None
    return key
