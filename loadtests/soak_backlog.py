"""How much memory and time the flush needs for a large access-log backlog.

``python -m loadtests.soak_backlog --entries 1000000``: in a private namespace of the local stack
it fills ``audit:access`` with that many decisions (the API's own encoding), then runs the flush
job (``sessiond flush``, the code a worker runs on each tick) until the list is empty, sampling
each flushing process's RSS every 20 ms. Prints the peak RSS, the drain time and the rows
written. A flush drains for at most ``storage.access_flush.DRAIN_BUDGET_S``, so a large backlog
takes several flushes, as it would take several scheduler ticks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from loadtests import harness
from storage.activity import ACCESS_LOG_KEY, AccessLog


async def fill(url: str, entries: int) -> float:
    """Pushes ``entries`` decisions; returns the Redis memory they take (MiB)."""
    client = aioredis.Redis.from_url(url)
    log = AccessLog(client, max_entries=entries + 1, max_bytes=2**40)
    now = time.time()
    try:
        for start in range(0, entries, 10_000):
            batch = [
                log.encode(now, f"user-{i % 50_000}", f"s{i % 3}", "granted", None, "/auth/check")
                for i in range(start, min(entries, start + 10_000))
            ]
            assert await log.append(batch) == 0
        return round(int(await client.memory_usage(ACCESS_LOG_KEY, samples=100) or 0) / 2**20, 1)
    finally:
        await client.aclose()


async def backlog(url: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        return int(await client.llen(ACCESS_LOG_KEY))
    finally:
        await client.aclose()


async def rows(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM audit_events WHERE kind = 'access'"))
    finally:
        await conn.close()


def flush_once(env: dict[str, str]) -> dict[str, Any]:
    proc = harness.sessiond("flush", ["flush"], env, harness.RESULTS / "soak_logs").start()
    started = time.perf_counter()
    peak = 0.0
    while proc.alive():
        peak = max(peak, harness.rss_mib(proc.pid) or 0.0)
        time.sleep(0.02)
    wall = time.perf_counter() - started
    code = proc.stop()
    if code != 0:
        raise RuntimeError(f"sessiond flush failed ({code}):\n{proc.tail()}")
    result: dict[str, Any] = {}
    for line in reversed(proc.log.read_text().splitlines()):
        try:
            result = json.loads(line)
            break
        except ValueError:
            continue
    return {"wall_s": round(wall, 2), "peak_rss_mib": peak, "result": result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak_backlog", description=__doc__)
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--redis-db", type=int, default=8)
    p.add_argument("--name", default="sessiond_backlog")
    args = p.parse_args(argv)
    env = harness.private_env(args.name, args.redis_db)
    settings = harness.settings_from(env)
    asyncio.run(harness.reset(settings))
    started = time.perf_counter()
    list_mib = asyncio.run(fill(settings.redis_url, args.entries))
    took = time.perf_counter() - started
    print(f"filled {args.entries} entries ({list_mib} MiB in Redis) in {took:.1f} s")
    runs: list[dict[str, Any]] = []
    while asyncio.run(backlog(settings.redis_url)) > 0 and len(runs) < 100:
        runs.append(flush_once(env))
        r = runs[-1]
        done = r["result"]
        print(
            f"flush: {r['wall_s']} s, peak RSS {r['peak_rss_mib']} MiB,"
            f" {done.get('access_entries')} entries, {done.get('access_pages')} pages"
        )
    written = asyncio.run(rows(settings.database_url))
    summary = {
        "entries": args.entries,
        "redis_list_mib": list_mib,
        "flushes": len(runs),
        "drain_s": round(sum(r["wall_s"] for r in runs), 1),
        "drain_s_in_flush": round(sum(float(r["result"].get("seconds", 0)) for r in runs), 1),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "rows_written": written,
        "page": settings.access_log_page,
        "load": harness.load_average(),
    }
    print(json.dumps(summary))
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    (harness.RESULTS / "soak_backlog.json").write_text(
        json.dumps({"summary": summary, "runs": runs}, indent=1)
    )
    return 0 if written == args.entries else 1


if __name__ == "__main__":
    sys.exit(main())
