"""The API's side of ``storage.reconcile``: a background task of every API process, of which one
per period takes the turn. It lives in the API because the API is what reads the cache: if the
API can reach Redis, so can its reconciler, whatever the workers can reach.

It also tells the process's ``AccessControl`` when Redis fails under it (``on_unavailable``), so
that a process that served no request during an outage still catches up before it trusts that
Redis again (``catch_up``), and it is where the admin routes hand an eviction that failed after
their commit (``publish``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from api.background import cancel, every
from api.cachetrust import REDIS_ERRORS, REDIS_UNAVAILABLE
from api.metrics import Metrics
from storage.cache import Cache
from storage.reconcile import Reconciled, reconcile, take_turn
from storage.state import Outcome, publish_snapshot

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self,
        cache: Cache,
        metrics: Metrics,
        *,
        period_s: float,
        on_unavailable: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.cache = cache
        self.metrics = metrics
        self.period_s = period_s
        self.on_unavailable = on_unavailable
        self._task: asyncio.Task[None] | None = None

    def _failed(self, exc: BaseException) -> None:
        if self.on_unavailable is not None and isinstance(exc, REDIS_UNAVAILABLE):
            self.on_unavailable(exc)

    async def step(self) -> int:
        """One turn if this process wins it; returns how many stale entries it repaired. A turn
        touches both servers: a bare ``OSError`` may be PostgreSQL's (the cache stays trusted
        then, as in the API's PostgreSQL-down mode), so it counts against Redis only if Redis
        does not answer a ping either."""
        try:
            if not await take_turn(self.cache, period_s=self.period_s):
                return 0
            return self._report(await reconcile(self.cache))
        except REDIS_ERRORS as exc:
            self._failed(exc)
            raise
        except OSError as exc:
            if not await self.cache.ping():
                self._failed(exc)
            raise

    async def catch_up(self) -> Reconciled:
        """A turn whoever holds the period's lock (turns are safe to overlap): what the API
        runs before it trusts a Redis that was unreachable."""
        done = await reconcile(self.cache)
        self._report(done)
        log.info(
            "cache caught up with PostgreSQL",
            extra={"checked": done.checked, "repaired": done.repaired, "full": done.full},
        )
        return done

    def _report(self, done: Reconciled) -> int:
        if done.repaired:
            self.metrics.reconciled.inc(by=done.repaired)
            log.warning(
                "stale cache entries repaired (a Redis write was lost or is late, or a server"
                " went back in time)",
                extra={
                    "evicted": done.evicted,
                    "reset": done.reset,
                    "checked": done.checked,
                    "full": done.full,
                },
            )
        return done.repaired

    async def publish(self, outcome: Outcome) -> None:
        """Syncs Redis after an admin change committed. When Redis fails, the change stays
        committed and the request succeeds: the next turn evicts the entry (the change is past
        the mark), and this process decides from PostgreSQL until it has caught up."""
        try:
            await publish_snapshot(self.cache, outcome)
        except REDIS_UNAVAILABLE as exc:
            log.warning(
                "cache eviction after a committed change failed; handed to the reconciler",
                extra={"user_id": outcome.user_id, "error": f"{type(exc).__name__}"},
            )
            self._failed(exc)

    def start(self) -> None:
        if self.period_s > 0 and self._task is None:
            self._task = every(self.period_s, self.step, name="reconciler")

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None
