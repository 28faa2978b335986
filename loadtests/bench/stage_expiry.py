"""Stage 4: the expiry sweep of a million connected users (``bench_expiry``)."""

from __future__ import annotations

import argparse
from typing import Any

import redis.asyncio as aioredis

from loadtests import bench_expiry
from loadtests.bench.base import BenchBase


class Expiry(BenchBase):
    """Stage 4. A mixin of ``Bench``: it needs the running system ``BenchBase`` starts."""

    def expiry(self) -> dict[str, Any]:
        a = self.args
        ns = argparse.Namespace(
            users=a.expiry_users, stale=a.expiry_stale, pending=a.expiry_pending,
            cached=a.expiry_users, batch=self.settings.expiry_batch_size,
        )  # fmt: skip
        result = self.loop.run(bench_expiry.run(ns, settings=self.settings))
        self.loop.run(_flush_redis(self.settings.redis_url))
        return result


async def _flush_redis(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
