"""Benchmark of the periodic jobs on the local stack; prints one JSON object.

Measures one expiry sweep over N connected users of whom S are idle (defaults: 1,000,000 and
100,000), a steady-state sweep with nothing to expire, and one flush of P pending activity entries
(default 100,000), with every connected user cached in Redis as in production. It uses its own
database (``sessiond_bench``, created when missing) and Redis db 11, so it never touches the
development or test data. The whole run is bounded (``--timeout``).

    .venv/bin/python loadtests/bench_expiry.py [--users N] [--stale S] [--pending P]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from sessiond import stack
from sessiond.config import Settings
from storage import cache as cache_mod
from storage import db as db_mod
from storage import expiry, flush, redis_conn
from storage.activity import ACCESS_LOG_KEY, ACTIVITY_KEY, AccessLog, ActivityBuffer
from storage.cache import UserSnapshot

BENCH_DB = "sessiond_bench"
BENCH_REDIS_DB = 11
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
IDLE_S = 1800


def bench_settings() -> Settings:
    env = stack.StackConfig.from_env().env_dict()
    base = Settings.model_validate({k.removeprefix("SESSIOND_").lower(): v for k, v in env.items()})
    pg = urlsplit(base.database_url)
    rd = urlsplit(base.redis_url)
    return base.model_copy(
        update={
            "database_url": urlunsplit(pg._replace(path=f"/{BENCH_DB}")),
            "redis_url": urlunsplit(rd._replace(path=f"/{BENCH_REDIS_DB}")),
            "env": "test",
        }
    )


async def prepare(settings: Settings) -> None:
    pg = urlsplit(settings.database_url)
    name = pg.path.lstrip("/")
    admin = await asyncpg.connect(urlunsplit(pg._replace(path="/postgres")))
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    await db_mod.migrate(settings)


async def seed(pg: asyncpg.Connection, users: int, stale: int) -> float:
    """``users`` connected users with one session each; every (users/stale)-th one is idle."""
    started = time.perf_counter()
    every = max(1, users // max(stale, 1))
    await pg.execute("TRUNCATE audit_events, processed_events, sessions, users RESTART IDENTITY")
    await pg.execute(
        """
        INSERT INTO users (id, name, email, status, connected_at, seen_at, last_activity_at,
                           version, created_at, updated_at)
        SELECT 'user-' || g, 'User ' || g, 'user' || g || '@example.com', 'connected',
               $1::timestamptz - interval '3 hours',
               CASE WHEN g % $2 = 0 AND g / $2 <= $3
                    THEN $1::timestamptz - interval '31 minutes' - (g % 3600) * interval '1 second'
                    ELSE $1::timestamptz - (g % 1790) * interval '1 second' END,
               NULL, 1, now(), now()
        FROM generate_series(1, $4::int) AS g
        """,
        NOW,
        every,
        stale,
        users,
    )
    await pg.execute(
        """
        INSERT INTO sessions (user_id, session_id, status, started_at, last_event_at, source)
        SELECT 'user-' || g, '', 'connected', $1::timestamptz - interval '3 hours',
               $1::timestamptz - interval '3 hours', 'auth'
        FROM generate_series(1, $2::int) AS g
        """,
        NOW,
        users,
    )
    await pg.execute("VACUUM ANALYZE users")
    await pg.execute("VACUUM ANALYZE sessions")
    return round(time.perf_counter() - started, 2)


_FILL = """
for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do
  redis.call('SET', 'user:user-' .. i, ARGV[3], 'EX', 3600)
end
return 1
"""


async def fill_cache(cache: cache_mod.Cache, users: int) -> float:
    """``user:<id>`` for every connected user, as in production, so that the keyspace the flush
    walks (SCAN for leftover keys) and the evictions are realistic. Chunks keep Redis responsive."""
    started = time.perf_counter()
    script = cache.client.register_script(_FILL)
    payload = UserSnapshot(
        user_id="user-0",
        status="connected",
        version=1,
        name="User",
        email="user@example.com",
        sessions=[""],
        connected_at=NOW - timedelta(hours=3),
        seen_at=NOW - timedelta(hours=1),
    ).to_json()
    for start in range(1, users + 1, 50_000):
        await script(args=[start, min(users, start + 49_999), payload])
    return round(time.perf_counter() - started, 2)


async def run(args: argparse.Namespace, settings: Settings | None = None) -> dict[str, Any]:
    """``settings``: another namespace than ``sessiond_bench``/db 11 (``loadtests/bench/``)."""
    settings = settings or bench_settings()
    await prepare(settings)
    pg = await asyncpg.connect(settings.database_url)
    await db_mod.open_db(settings)
    cache = cache_mod.Cache(redis_conn.connect(settings), ttl_s=settings.cache_ttl_s)
    await cache.client.flushdb()
    buffer = ActivityBuffer(cache.client)
    out: dict[str, Any] = {
        "users": args.users,
        "stale": args.stale,
        "pending": args.pending,
        "cached": args.cached,
    }
    try:
        out["seed_s"] = await seed(pg, args.users, args.stale)
        out["cache_fill_s"] = await fill_cache(cache, args.cached)
        out["redis_keys"] = await cache.client.dbsize()

        result = await expiry.sweep(
            cache, buffer, now=NOW, idle_timeout_s=IDLE_S, batch_size=args.batch
        )
        assert result.expired == args.stale, result
        assert result.evicted == min(args.stale, args.cached) or args.cached < args.users, result
        out["sweep"] = {
            "seconds": result.seconds,
            "expired": result.expired,
            "batches": result.batches,
            "batch_size": args.batch,
            "users_per_s": round(result.expired / result.seconds),
        }
        connected = await pg.fetchval("SELECT count(*) FROM users WHERE status = 'connected'")
        assert connected == args.users - args.stale, connected

        steady = await expiry.sweep(
            cache, buffer, now=NOW, idle_timeout_s=IDLE_S, batch_size=args.batch
        )
        out["sweep_nothing_to_expire_s"] = steady.seconds
        out["redis_keys_after_sweep"] = await cache.client.dbsize()

        # Pending activity for the first P connected users, one entry each, as the API leaves it.
        ids = [
            r["id"]
            for r in await pg.fetch(
                "SELECT id FROM users WHERE status = 'connected' LIMIT $1", args.pending
            )
        ]
        at = NOW.timestamp() + 1
        for start in range(0, len(ids), 10_000):
            await cache.client.hset(
                ACTIVITY_KEY, mapping={uid: at for uid in ids[start : start + 10_000]}
            )
        fl = await flush.flush_activity(buffer)
        assert fl.users_updated == len(ids), fl
        assert fl.cache_refreshed == min(len(ids), args.cached) or args.cached < args.users, fl
        out["flush"] = {
            "seconds": fl.seconds,
            "entries": fl.activity_entries,
            "rows_updated": fl.users_updated,
            "cache_refreshed": fl.cache_refreshed,
            "statements": fl.batches,
            "entries_per_s": round(fl.activity_entries / fl.seconds),
        }

        # Access decisions as the API journals them, 100,000 of them, through the same job.
        entry = json.dumps(
            {"at": NOW.isoformat(), "user_id": "user-1", "session_id": None,
             "decision": "granted", "reason": None, "route": "/auth/check"},
            separators=(",", ":"),
        )  # fmt: skip
        for _ in range(0, args.pending, 10_000):
            await cache.client.rpush(ACCESS_LOG_KEY, *([entry] * 10_000))
        fa = await flush.flush_activity(buffer, access_log=AccessLog(cache.client))
        out["access_log_flush"] = {"seconds": fa.seconds, "entries": fa.access_entries}
    finally:
        await cache.close()
        await db_mod.close_db()
        await pg.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--stale", type=int, default=100_000)
    p.add_argument("--pending", type=int, default=100_000)
    p.add_argument("--cached", type=int, help="user:<id> keys in Redis (default: --users)")
    p.add_argument("--batch", type=int, default=5000)
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args()
    if args.cached is None:
        args.cached = args.users
    started = time.perf_counter()
    result = asyncio.run(asyncio.wait_for(run(args), timeout=args.timeout))
    result["total_s"] = round(time.perf_counter() - started, 2)
    result["machine_cpus"] = os.cpu_count()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
