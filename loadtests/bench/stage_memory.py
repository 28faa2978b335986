"""Stage 5: Redis memory per cached user."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from loadtests.bench.base import BenchBase
from storage import cache as cache_mod
from storage import redis_conn


class RedisMemory(BenchBase):
    """Stage 5. A mixin of ``Bench``: it needs the running system ``BenchBase`` starts."""

    def redis_memory(self) -> dict[str, Any]:
        n = self.args.cache_users

        async def measure() -> dict[str, Any]:
            client = redis_conn.connect(self.settings)
            cache = cache_mod.Cache(client, ttl_s=self.settings.cache_ttl_s)
            try:
                await client.flushdb()
                before = int((await client.info("memory"))["used_memory"])
                now = datetime.now(UTC)
                for start in range(0, n, 1000):
                    await cache.sync_many([
                        cache_mod.UserSnapshot(
                            user_id=f"user-{i:07d}", status="connected", version=3,
                            name=f"User {i}", email=f"user{i}@example.com", sessions=["web"],
                            connected_at=now, seen_at=now, last_activity_at=now,
                        )
                        for i in range(start, min(n, start + 1000))
                    ])  # fmt: skip
                after = int((await client.info("memory"))["used_memory"])
                keys = await client.dbsize()
                sample = [f"user-{i:07d}" for i in range(0, n, max(1, n // 1000))]
                usage = 0
                for uid in sample:
                    usage += int(await client.memory_usage(cache_mod.user_key(uid)) or 0)
                    usage += int(await client.memory_usage(cache_mod.version_key(uid)) or 0)
                value = await client.get(cache_mod.user_key(sample[0]))
                await client.flushdb()
                return {
                    "users": n,
                    "keys": keys,
                    "used_memory_delta_mib": round((after - before) / 2**20, 1),
                    "memory_usage_mib": round(usage / len(sample) * n / 2**20, 1),
                    "bytes_per_user": round(usage / len(sample)),
                    "value_bytes": len(value or b""),
                }
            finally:
                await cache.close()

        return self.loop.run(measure())
