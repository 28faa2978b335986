"""The scheduler's tick claims in Redis (``sched:<job>:<tick>``), kept with the other keys here.

A claim names a tick, not a leader: ``SET NX PX`` on the tick's key, so exactly one replica wins
each tick and a replica that dies mid-tick blocks nothing but that tick.
"""

from __future__ import annotations

import math

import redis

from sessiond.errors import DependencyUnavailable
from storage.redis_conn import SyncClient


def tick_key(job: str, tick: int) -> str:
    return f"sched:{job}:{tick}"


def claim_tick(client: SyncClient, job: str, period_s: float, now: float, owner: str) -> int | None:
    """The tick number when this replica won it, else ``None``. The key outlives the tick window so
    a late replica cannot claim the same tick again; it never stands in the way of the next one.
    Raises ``DependencyUnavailable`` when Redis does not answer."""
    tick = math.floor(now / period_s)
    ttl_ms = max(1000, int(period_s * 3000))
    try:
        won = client.set(tick_key(job, tick), owner, nx=True, px=ttl_ms)
    except redis.RedisError as exc:
        raise DependencyUnavailable(f"redis: {type(exc).__name__}") from exc
    return tick if won else None
