"""Stage 3: PostgreSQL row updates caused by granted requests across two flushes."""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from loadtests import harness
from loadtests.bench.base import BenchBase
from loadtests.bench.tools import (
    WRK_TOKENS_LUA,
    token,
    wrk,
)


class ActivityWrites(BenchBase):
    """Stage 3. A mixin of ``Bench``: it needs the running system ``BenchBase`` starts."""

    def activity_writes(self) -> dict[str, Any]:
        a = self.args
        assert self.api is not None
        users = [f"bench-ev-{u}" for u in range(min(a.request_users, a.event_users))]
        tokens = harness.RESULTS / "bench_tokens.txt"
        tokens.write_text("\n".join(token(self.settings, u, "web") for u in users) + "\n")
        script = harness.RESULTS / "bench_tokens.lua"
        script.write_text(WRK_TOKENS_LUA)
        self.sessiond_cli("flush")  # start from an empty activity buffer

        async def stats() -> dict[str, dict[str, int]]:
            conn = await asyncpg.connect(self.settings.database_url)
            try:
                rows = await conn.fetch(
                    "SELECT relname, n_tup_upd, n_tup_ins, n_tup_del FROM pg_stat_user_tables"
                )
            finally:
                await conn.close()
            return {
                r["relname"]: {"upd": r["n_tup_upd"], "ins": r["n_tup_ins"], "del": r["n_tup_del"]}
                for r in rows
            }

        def settled() -> dict[str, dict[str, int]]:
            """Backends report their counters at most once a second, or when they end (the flush
            CLI's does; the workers were stopped for that reason): wait until two readings a
            second apart agree."""
            time.sleep(1.0)
            last = self.loop.run(stats())
            for _ in range(20):
                time.sleep(1.0)
                now = self.loop.run(stats())
                if now == last:
                    return now
                last = now
            return last

        before = settled()
        flushes: list[dict[str, Any]] = []
        loads: list[dict[str, Any]] = []
        per_flush = a.requests // 2
        marker = harness.RESULTS / "bench_wrk.done"
        for _ in range(2):
            marker.unlink(missing_ok=True)
            env = {"BENCH_TOKENS": str(tokens), "BENCH_REQUESTS": str(per_flush)}
            loads.append(
                wrk(
                    f"http://127.0.0.1:{self.api_port}/auth/check",
                    seconds=120,
                    connections=a.connections,
                    script=script,
                    env={**env, "BENCH_DONE": str(marker)},
                    done_marker=marker,
                )
            )
            marker.unlink(missing_ok=True)
            time.sleep(0.5)  # the API pushes its buffers to Redis every 100 ms
            flushes.append(self.sessiond_cli("flush"))
        after = settled()
        delta = {
            table: {
                k: after[table][k] - before.get(table, {}).get(k, 0) for k in ("upd", "ins", "del")
            }
            for table in after
        }
        return {
            "requests_sent": sum(int(x["requests"] or 0) for x in loads),
            "granted_journaled": sum(int(f["access_entries"]) for f in flushes),
            "non_2xx": sum(int(x["non_2xx"]) for x in loads),
            "users": len(users),
            "flushes": [
                {
                    k: f[k]
                    for k in ("activity_entries", "users_updated", "access_entries", "seconds")
                }
                for f in flushes
            ],
            "row_updates": sum(d["upd"] for d in delta.values()),
            "row_inserts": sum(d["ins"] for d in delta.values()),
            "per_table": {t: d for t, d in delta.items() if any(d.values())},
        }
