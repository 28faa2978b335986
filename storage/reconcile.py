"""Redis catches up with PostgreSQL even when a worker's write to Redis was lost.

A worker commits a change, then syncs ``user:<id>``. If that sync never lands (Redis unreachable
from the worker past its retry budget, a network split that leaves Redis's data in place) the
entry of a user who logged out would stay until its TTL, and an API that can still read that
Redis would grant on it: the one way to a wrong 200 left. So every few seconds one API process
(a Redis lock elects it) reads the users PostgreSQL changed lately and evicts each entry older
than the user's row version, with its ``gone:`` mark (a login whose write was lost must not stay
refused either); an entry at the current version is left alone.

``updated_at`` is the transaction's start time, so the window covers transactions that commit up
to ``window_s`` after they began (the pipeline's batches take well under a second).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from storage.cache import Cache
from storage.db import conn

LOCK_KEY: Final = "sessiond:reconcile:lock"

_CHANGED = """
SELECT id, version FROM users
WHERE updated_at > now() - make_interval(secs => $1)
ORDER BY updated_at
LIMIT $2
"""


@dataclass(frozen=True, slots=True)
class Reconciled:
    checked: int
    evicted: int


async def reconcile(cache: Cache, *, window_s: float, limit: int = 100_000) -> Reconciled:
    """Evicts the cached users whose entry is older than their row; the caller holds the turn."""
    rows = await conn().execute_query_dict(_CHANGED, [window_s, limit])
    versions = [(str(r["id"]), int(r["version"])) for r in rows]
    evicted = await cache.evict_many(versions, disconnected=False, older_only=True)
    return Reconciled(checked=len(versions), evicted=evicted)


async def take_turn(cache: Cache, *, period_s: float) -> bool:
    """True for the one process that reconciles in this period (``SET NX PX``); the lock lapses
    on its own, so a process that dies does not block the next period."""
    return bool(await cache.client.set(LOCK_KEY, "1", nx=True, px=max(int(period_s * 1000), 1)))
