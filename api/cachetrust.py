"""When an API process may believe its Redis, and how a miss is written back to it.

Redis is a projection of PostgreSQL that can fall behind without saying so: while it is
unreachable, writes to it (a worker's eviction, an admin disconnect's) are lost, and a Redis
restored from a snapshot or failed over to a lagging replica answers with an older past. So:

- after any Redis failure in this process (a request, the reconciler, an admin route) the cache
  is bypassed and decisions come from PostgreSQL; a background probe pings Redis and, once it
  answers, runs a reconciler turn (``catch_up``, ``storage.reconcile``) that brings every entry
  changed since the last successful turn back to its row. Only then is the cache trusted again,
  and only if no new failure happened during the catch-up. If the catch-up cannot run
  (PostgreSQL down too), the bypass stays: decisions from PostgreSQL, which is down, so 503;
  never a grant from a cache nobody has checked.
- a refill after a miss is version-guarded; a refusal means Redis has seen a newer version than
  the row just read. That read is not served (``refill``): the row is read again, and a row
  still older than what Redis saw is PostgreSQL gone backwards, so the entry is reset to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from api.background import cancel
from storage.cache import Ahead, Cache, RowState, UserSnapshot
from storage.redis_conn import REDIS_CONNECTION_ERRORS, AsyncClient, ping

log = logging.getLogger(__name__)

REDIS_ERRORS: Final = REDIS_CONNECTION_ERRORS
REDIS_UNAVAILABLE: Final = (*REDIS_ERRORS, OSError)
"""What a Redis call raises when the server (a cluster's master) is down or unreachable, or a
cluster's failover is under way: not a bug of ours."""
REDIS_PROBE_S: Final = 0.5


class RedisTrust:
    """Per process: is the cache bypassed, and the probe that ends the bypass."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.down = False
        self.failures = 0
        self.catch_up: Callable[[], Awaitable[object]] | None = None
        self._probe: asyncio.Task[None] | None = None

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        if not self.down:
            log.warning(
                "redis unavailable; deciding from PostgreSQL until it answers and caught up",
                extra={"error": f"{type(exc).__name__}: {str(exc)[:300]}"},
            )
        self.down = True
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._run(), name="probe")

    async def _run(self) -> None:
        while self.down:
            await asyncio.sleep(REDIS_PROBE_S)
            failures = self.failures
            try:
                await ping(self.client)
                if self.catch_up is not None:
                    await self.catch_up()
            except Exception as exc:  # still down, or PostgreSQL is: keep off the cache
                log.debug("redis not trusted yet", extra={"error": repr(exc)[:200]})
                continue
            if failures == self.failures:
                self.down = False
                log.warning("redis available again and caught up; cache in use")

    async def close(self) -> None:
        await cancel(self._probe)
        self._probe = None


async def refill(
    cache: Cache,
    trust: RedisTrust,
    snapshot: UserSnapshot,
    load: Callable[[str], Awaitable[UserSnapshot | None]],
) -> UserSnapshot | None:
    """Writes a miss's row back (version-guarded) and returns what to decide on: the row, or,
    when the guard refused it, the row read again (``None``: the user is gone)."""
    try:
        newer = await cache.refill(snapshot)
    except REDIS_UNAVAILABLE as exc:  # PostgreSQL answered; the refill can wait
        trust.failed(exc)
        return snapshot
    if newer is None:
        return snapshot
    # A read that starts now sees every commit Redis has seen (Redis is written after commit).
    fresh = await load(snapshot.user_id)
    row = RowState(snapshot.user_id, -1, False)
    if fresh is not None:
        row = RowState(fresh.user_id, fresh.version, fresh.connected)
    if row.version < newer:
        log.warning(
            "cached version newer than PostgreSQL's; entry reset",
            extra={"user_id": snapshot.user_id, "cached": newer, "row": row.version},
        )
        try:
            await cache.reset([(Ahead(snapshot.user_id, newer), row)])
        except REDIS_UNAVAILABLE as exc:
            trust.failed(exc)
    return fresh
