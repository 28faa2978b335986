"""Per-process resources of a worker: settings, the Redis cache and the asyncio loop thread.

Opened once after the worker boots (``StorageMiddleware``) and shared by every actor thread; the
coroutines all run on Dramatiq's single event-loop thread, where Tortoise and redis-asyncio live.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TypeVar

import dramatiq
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.middleware import MiddlewareError
from dramatiq.middleware.asyncio import AsyncIO

from sessiond.config import Settings
from storage import cache as cache_mod
from storage import db, redis_conn
from storage.redis_policy import check_memory_policy

T = TypeVar("T")
log = logging.getLogger(__name__)


class StorageNotOpen(MiddlewareError):
    """A ``MiddlewareError`` is the one failure Dramatiq's boot does not swallow: any other
    exception in ``before_worker_boot`` is logged and the worker consumes anyway, so a worker
    refused by the Redis policy check would dead-letter every event it took."""


class Runtime:
    """What actors need at run time; ``cache`` is ``None`` until the worker has booted."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache: cache_mod.Cache | None = None

    def run(self, coro: Awaitable[T]) -> T:
        """Runs a coroutine on the worker's event loop and waits for it from an actor thread."""
        thread = get_event_loop_thread()
        if thread is None:
            raise RuntimeError("the AsyncIO middleware is not installed")
        return thread.run_coroutine(coro)

    def require_cache(self) -> cache_mod.Cache:
        if self.cache is None:
            raise RuntimeError("worker storage is not open")
        return self.cache

    async def open(self) -> None:
        await db.open_db(self.settings)
        self.cache = cache_mod.Cache(
            redis_conn.connect(self.settings), ttl_s=self.settings.cache_ttl_s
        )
        if self.settings.redis_policy_check:
            await check_memory_policy(self.cache.client)

    async def close(self) -> None:
        if self.cache is not None:
            await self.cache.close()
            self.cache = None
        await db.close_db()


class StorageMiddleware(AsyncIO):
    """The event loop thread (Dramatiq's ``AsyncIO``) plus Tortoise and Redis opened on it.

    One middleware owns both so the order is fixed: loop up, storage open, ..., storage closed,
    loop down, after the workers have finished their in-flight messages.
    """

    def __init__(self, runtime: Runtime) -> None:
        super().__init__()
        self.runtime = runtime

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        super().before_worker_boot(broker, worker)  # type: ignore[no-untyped-call]
        try:
            self.runtime.run(self.runtime.open())
        except Exception as exc:
            log.critical(
                "worker storage did not open; this process stops before consuming",
                extra={"error": f"{type(exc).__name__}: {exc}"[:500]},
            )
            # The loop thread is not a daemon: left running, it would keep this process alive.
            super().after_worker_shutdown(broker, worker)  # type: ignore[no-untyped-call]
            raise StorageNotOpen(str(exc)) from exc

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        try:
            self.runtime.run(self.runtime.close())
        finally:
            super().after_worker_shutdown(broker, worker)  # type: ignore[no-untyped-call]
