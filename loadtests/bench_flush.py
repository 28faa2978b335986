"""Benchmark of one activity flush; prints one JSON object.

U connected users with S sessions each (defaults: 10,000 and 1), every one of them cached in
Redis as in production, every session with a granted request buffered as the API leaves it
(``Recorder.flush``: one touch per user and one per session, in pipelines). Then one flush
(``storage.flush.flush_activity``, the scheduler's job) is timed; ``--rounds`` times, each with
newer request times, so that every round writes every row. Its own database
(``sessiond_bench_flush``, created when missing) and Redis db 10: it never touches the
development or test data.

    .venv/bin/python loadtests/bench_flush.py [--users U] [--sessions S] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from loadtests.bench_expiry import NOW, bench_settings, prepare
from sessiond.config import Settings
from storage import cache as cache_mod
from storage import db as db_mod
from storage import flush, redis_conn
from storage.activity import ActivityBuffer
from storage.cache import UserSnapshot

FLUSH_DB = "sessiond_bench_flush"
FLUSH_REDIS_DB = 10


def flush_settings() -> Settings:
    base = bench_settings()
    pg, rd = urlsplit(base.database_url), urlsplit(base.redis_url)
    return base.model_copy(
        update={
            "database_url": urlunsplit(pg._replace(path=f"/{FLUSH_DB}")),
            "redis_url": urlunsplit(rd._replace(path=f"/{FLUSH_REDIS_DB}")),
        }
    )


async def seed(pg: asyncpg.Connection, users: int, sessions: int) -> None:
    await pg.execute("TRUNCATE audit_events, processed_events, sessions, users RESTART IDENTITY")
    await pg.execute(
        """
        INSERT INTO users (id, status, connected_at, seen_at, last_activity_at, version,
                           created_at, updated_at)
        SELECT 'user-' || g, 'connected', $1::timestamptz - interval '1 hour',
               $1::timestamptz - interval '1 hour', NULL, 1, now(), now()
        FROM generate_series(1, $2::int) AS g
        """,
        NOW,
        users,
    )
    await pg.execute(
        """
        INSERT INTO sessions (user_id, session_id, status, started_at, last_event_at, source)
        SELECT 'user-' || g, 's-' || k, 'connected', $1::timestamptz - interval '1 hour',
               $1::timestamptz - interval '1 hour', 'auth'
        FROM generate_series(1, $2::int) AS g, generate_series(1, $3::int) AS k
        """,
        NOW,
        users,
        sessions,
    )
    await pg.execute("VACUUM ANALYZE users")
    await pg.execute("VACUUM ANALYZE sessions")


async def fill_cache(cache: cache_mod.Cache, users: int, sessions: int) -> None:
    sids = [f"s-{k}" for k in range(1, sessions + 1)]
    old = NOW - timedelta(hours=1)
    for start in range(1, users + 1, 5000):
        snaps = [
            UserSnapshot(
                user_id=f"user-{g}",
                status="connected",
                version=1,
                sessions=sids,
                session_started=dict.fromkeys(sids, old),
                session_seen=dict.fromkeys(sids, old),
                connected_at=old,
                seen_at=old,
            )
            for g in range(start, min(users, start + 4999) + 1)
        ]
        await cache.sync_many(snaps)


async def buffer_requests(buffer: ActivityBuffer, users: int, sessions: int, at: float) -> None:
    """One granted request per session at ``at``, pushed as the API's recorder pushes them."""
    for start in range(1, users + 1, 1000):
        ids = [f"user-{g}" for g in range(start, min(users, start + 999) + 1)]
        async with buffer.client.pipeline(transaction=False) as pipe:
            await buffer.queue_touches(
                pipe,
                [(u, at) for u in ids],
                [(u, f"s-{k}", at) for u in ids for k in range(1, sessions + 1)],
            )
            await pipe.execute()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = flush_settings()
    await prepare(settings)
    pg = await asyncpg.connect(settings.database_url)
    await db_mod.open_db(settings)
    cache = cache_mod.Cache(redis_conn.connect(settings), ttl_s=settings.cache_ttl_s)
    await cache.client.flushdb()
    buffer = ActivityBuffer(cache.client)
    rounds: list[dict[str, Any]] = []
    try:
        await seed(pg, args.users, args.sessions)
        await fill_cache(cache, args.users, args.sessions)
        for n in range(args.rounds):
            await buffer_requests(buffer, args.users, args.sessions, NOW.timestamp() + n + 1)
            result = await flush.flush_activity(buffer)
            assert result.users_updated == args.users, result
            assert result.sessions_updated == args.users * args.sessions, result
            rounds.append(result.to_dict())
    finally:
        await cache.close()
        await db_mod.close_db()
        await pg.close()
    seconds = [r["seconds"] for r in rounds]
    keep = ("activity_entries", "users_updated", "session_entries", "sessions_updated",
            "cache_refreshed", "batches")  # fmt: skip
    return {
        "users": args.users,
        "sessions_per_user": args.sessions,
        "rounds": args.rounds,
        "flush_s": seconds,
        "flush_median_s": round(statistics.median(seconds), 4),
        "last": {k: rounds[-1][k] for k in keep},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--sessions", type=int, default=1, help="sessions per user, all active")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()
    started = time.perf_counter()
    result = asyncio.run(asyncio.wait_for(run(args), timeout=args.timeout))
    result["total_s"] = round(time.perf_counter() - started, 2)
    result["machine_cpus"] = os.cpu_count()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
