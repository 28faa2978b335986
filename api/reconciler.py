"""The API's side of ``storage.reconcile``: a background task of every API process, of which one
per period does the work. It lives in the API because the API is what reads the cache: if the
API can reach Redis, so can its reconciler, whatever the workers can reach."""

from __future__ import annotations

import asyncio
import logging

from api.background import cancel, every
from api.metrics import Metrics
from storage.cache import Cache
from storage.reconcile import reconcile, take_turn

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, cache: Cache, metrics: Metrics, *, period_s: float, window_s: float) -> None:
        self.cache = cache
        self.metrics = metrics
        self.period_s = period_s
        self.window_s = window_s
        self._task: asyncio.Task[None] | None = None

    async def step(self) -> int:
        """One turn if this process wins it; returns how many stale entries it evicted."""
        if not await take_turn(self.cache, period_s=self.period_s):
            return 0
        done = await reconcile(self.cache, window_s=self.window_s)
        if done.evicted:
            self.metrics.reconciled.inc(by=done.evicted)
            log.warning(
                "stale cache entries evicted (a worker's Redis write was lost or is late)",
                extra={"evicted": done.evicted, "checked": done.checked},
            )
        return done.evicted

    def start(self) -> None:
        if self.period_s > 0 and self._task is None:
            self._task = every(self.period_s, self.step, name="reconciler")

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None
