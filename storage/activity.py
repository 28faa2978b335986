"""Buffers in Redis for what happens on every request: activity and access decisions.

The API writes here with O(1) work per request and never touches PostgreSQL; the flush job moves
both buffers to PostgreSQL in batches (CONTRACT §2, §5), serialised by one Redis lock:
- activity entries stay in the live hash until PostgreSQL and the cache have them, and are then
  deleted only if no newer request replaced them (``storage.flush``), so no reader ever misses one;
- the access log is renamed to one fixed draining key, journaled, then deleted; a draining key left
  by a crashed flush is simply journaled first by the next one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

ACTIVITY_KEY = "activity"
ACCESS_LOG_KEY = "audit:access"
ACCESS_LOG_DRAINING_KEY = "audit:access:draining"

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

    async def queue_touches(self, pipe: Pipeline, touches: Iterable[tuple[str, float]]) -> None:
        """Queues many touches on a caller's pipeline: one round trip for a whole batch."""
        for user_id, at in touches:
            await self._touch(keys=[ACTIVITY_KEY], args=[user_id, at], client=pipe)

    async def pending(self, user_id: str) -> datetime | None:
        """The newest activity not yet flushed to PostgreSQL."""
        raw = await self.client.hget(ACTIVITY_KEY, user_id)
        return datetime.fromtimestamp(float(raw), tz=UTC) if raw else None


class AccessLog:
    """``audit:access`` list of JSON access decisions, journaled to ``audit_events`` in batches."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    @staticmethod
    def encode(entry: dict[str, Any]) -> str:
        return json.dumps(entry, separators=(",", ":"))

    async def record(self, entry: dict[str, Any]) -> None:
        await self.client.rpush(ACCESS_LOG_KEY, self.encode(entry))

    async def drain(self) -> tuple[str | None, list[dict[str, Any]]]:
        """(draining key, entries): a leftover draining key first, else the live list renamed."""
        if not await self.client.exists(ACCESS_LOG_DRAINING_KEY):
            try:
                await self.client.rename(ACCESS_LOG_KEY, ACCESS_LOG_DRAINING_KEY)
            except aioredis.ResponseError:  # "no such key": nothing to drain
                return None, []
        raw = await self.client.lrange(ACCESS_LOG_DRAINING_KEY, 0, -1)
        return ACCESS_LOG_DRAINING_KEY, [json.loads(r) for r in raw]

    async def ack(self, key: str) -> None:
        await self.client.delete(key)
