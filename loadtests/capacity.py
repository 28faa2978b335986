"""``python -m loadtests.capacity``: what one unit of work costs, as inputs to docs/capacity.md.

On a loaded machine requests/s are noise; CPU seconds per unit of work and bytes per user or
event hardly move. Each phase reads the CPU time (utime+stime, with reaped children's:
``/proc/<pid>/stat``) of every server's process tree before and after a fixed amount of work,
less the idle rate measured first, and divides:

1. logins: ``--users`` seed-form ``connected`` events (no ``session_id``): CPU per 1,000 events
   of the partition workers, the ingress (a process of its own), RabbitMQ, Redis, PostgreSQL;
   bytes per connected user in Redis (``used_memory`` delta, ``MEMORY USAGE``) and PostgreSQL.
2. churn: ``--rounds`` x (a logout and a login per user): the same per event, and the tables'
   and WAL's growth per event (the user count stays put).
3. ``/auth/check`` cache hits, ``--requests`` over the users' tokens (wrk, fixed count), then one
   ``sessiond flush`` (the scheduler's job: activity and access audit into PostgreSQL).
4. ``/auth/check`` on the PostgreSQL fallback, Redis emptied. ``--cluster``: on the local cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from actors.topology import JOBS_QUEUE
from loadtests import harness
from loadtests.bench import stage_cluster
from loadtests.bench.base import BenchBase
from loadtests.bench.report import machine
from loadtests.bench.tools import WRK_TOKENS_LUA, event, publish_batches, say, token, wrk
from sessiond import stack
from sessiond.cli import worker_argv
from sessiond.stack import cluster, postgres
from sessiond.stack.cluster_config import ClusterConfig
from sessiond.stack.proc import read_pid
from storage import redis_conn
from storage.keys import CLUSTER, SINGLE, user_key

T = TypeVar("T")
SERVERS = ("api", "worker", "ingress", "rabbitmq", "redis", "postgres")

SIZES = """
SELECT c.relname AS name, pg_total_relation_size(c.oid) AS bytes FROM pg_class c
WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace
"""
ROWS = 'SELECT count(*) AS n, coalesce(sum(pg_column_size(t.*)), 0) AS b FROM "{}" t'


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its living descendants, with what each has reaped: a backend
    or worker that ends between two readings is still counted (in its parent's cutime)."""
    ticks = float(os.sysconf("SC_CLK_TCK"))
    total = 0
    for pid in [root, *harness.descendants(root)]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])
    return total / ticks


def server_roots(bench: Capacity, on_cluster: bool) -> dict[str, list[int]]:
    """The root pid of every server process tree, by kind."""
    assert bench.api is not None and bench.worker is not None and bench.ingress is not None
    roots = {"api": [bench.api.pid], "worker": [bench.worker.pid], "ingress": [bench.ingress.pid]}
    if on_cluster:
        for name, info in cluster.status(ClusterConfig.from_env()).items():
            kind = name.split("-")[0]
            if info.get("pid"):
                roots.setdefault(kind, []).append(int(info["pid"]))
        return roots
    cfg = stack.StackConfig.from_env()
    pidfiles = {"rabbitmq": cfg.pidfile("rabbitmq"), "redis": cfg.pidfile("redis"),
                "postgres": postgres.home(cfg) / "postgres" / "postmaster.pid"}  # fmt: skip
    for kind, pidfile in pidfiles.items():
        pid = read_pid(pidfile)
        if pid is not None:
            roots[kind] = [pid]
    return roots


class Capacity(BenchBase):
    """``BenchBase``'s system under test, and the readings each phase takes."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str] | None = None) -> None:
        super().__init__(args, env)
        self.layout = CLUSTER if self.settings.redis_cluster else SINGLE
        self.roots: dict[str, list[int]] = {}
        self.idle: dict[str, float] = {}
        self.ingress: harness.Proc | None = None

    def start(self) -> None:
        """The ingress in a process of its own, to have its cost apart: the ingest queue has one
        active consumer, so its ceiling is one process's."""
        self.env["SESSIOND_INGRESS"] = "false"
        super().start()
        argv = [*worker_argv(1, 1, None), "--queues", JOBS_QUEUE]
        env = {**self.env, "SESSIOND_INGRESS": "true"}
        self.ingress = harness.Proc("ingress", argv, env, self.logs / "ingress.log").start()

    def stop(self) -> None:
        super().stop()
        if self.ingress is not None:
            self.ingress.stop()

    def cpu(self) -> dict[str, float]:
        """CPU seconds of each server tree, and Redis commands (those in scripts too) so far."""
        out = {kind: sum(tree_cpu(p) for p in self.roots.get(kind, [])) for kind in SERVERS}
        return {**out, "redis_cmds": self.redis_info("total_commands_processed")}

    def measure_idle(self, seconds: float) -> None:
        """Once the start-up is over: the ingress's tree under 5% of a core for a second."""
        for _ in range(30):
            if self.costed(lambda: time.sleep(1.0))[0]["ingress"] < 0.05:
                break
        used, wall, _ = self.costed(lambda: time.sleep(seconds))
        self.idle = {k: v / wall for k, v in used.items()}

    def costed(self, work: Callable[[], Any]) -> tuple[dict[str, float], float, Any]:
        """CPU seconds of each server while ``work`` runs, less its idle rate over that time."""
        before, t = self.cpu(), time.monotonic()
        result = work()
        after, wall = self.cpu(), time.monotonic() - t
        used = {k: max(0.0, after[k] - before[k] - self.idle.get(k, 0.0) * wall) for k in after}
        say(f"{wall:.1f} s of work (load average {harness.load_average()})")
        return used, wall, result

    def pg(self, query: str) -> list[asyncpg.Record]:
        async def run() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self.settings.database_url)
            try:
                return list(await conn.fetch(query))
            finally:
                await conn.close()

        return self.loop.run(run())

    def sizes(self) -> dict[str, dict[str, int]]:
        """Bytes on disk (heap, indexes, TOAST), rows and their data bytes (``pg_column_size``)
        per table, audit partitions summed under ``audit_events``."""
        out: dict[str, dict[str, int]] = {}
        for r in self.pg(SIZES):
            name = "audit_events" if r["name"].startswith("audit_events") else r["name"]
            row = out.setdefault(name, {"bytes": 0, "rows": 0, "data": 0})
            count = self.pg(ROWS.format(r["name"]))[0]  # names from pg_class, not input
            for key, value in (("bytes", r["bytes"]), ("rows", count["n"]), ("data", count["b"])):
                row[key] += int(value)
        return out

    def wal(self) -> int:
        """Bytes of WAL written so far (the position of its end)."""
        return int(self.pg("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0') AS d")[0]["d"])

    def redis(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        async def run() -> T:
            client = redis_conn.connect(self.settings)
            try:
                return await fn(client)
            finally:
                await client.aclose()

        return self.loop.run(run())

    def redis_info(self, field: str) -> int:
        """``field`` of INFO, summed over the masters on a cluster."""

        async def read(client: Any) -> int:
            if not self.settings.redis_cluster:
                return int((await client.info())[field])
            info = await client.info(target_nodes=client.PRIMARIES)
            return sum(int(v[field]) for v in info.values())

        return self.redis(read)

    def redis_key_bytes(self, users: list[str]) -> dict[str, float]:
        """Mean ``MEMORY USAGE`` per user of each of a user's keys (0 when absent)."""
        kinds = {"user": user_key, "uver": self.layout.version, "gone": self.layout.gone}

        async def read(client: Any) -> dict[str, float]:
            out: dict[str, float] = {}
            for kind, key in kinds.items():
                sizes = [int(await client.memory_usage(key(u)) or 0) for u in users]
                out[kind] = round(sum(sizes) / len(users), 1)
            return out

        return self.redis(read)

    def pipeline(self, bodies: list[bytes]) -> tuple[dict[str, float], float]:
        want = self.processed() + len(bodies)

        def work() -> None:
            publish_batches(self.settings, self.settings.events_exchange, "auth.capacity", bodies)
            harness.wait_for(lambda: self.processed() >= want, timeout=self.args.timeout,
                             what="events applied", interval=0.1)  # fmt: skip

        return self.costed(work)[:2]

    def requests(self, users: list[str], n: int) -> tuple[dict[str, float], float, dict[str, Any]]:
        tokens, script, marker = (
            harness.RESULTS / f"capacity_{n}" for n in ("tokens", "lua", "done")
        )
        tokens.write_text("\n".join(token(self.settings, u) for u in users) + "\n")
        script.write_text(WRK_TOKENS_LUA)
        marker.unlink(missing_ok=True)
        env = {"BENCH_TOKENS": str(tokens), "BENCH_REQUESTS": str(n), "BENCH_DONE": str(marker)}
        url = f"http://127.0.0.1:{self.api_port}/auth/check"
        used, wall, out = self.costed(
            lambda: wrk(url, seconds=int(self.args.timeout), connections=self.args.connections,
                        script=script, env=env, done_marker=marker)
        )  # fmt: skip
        return used, wall, out

    def flush(self) -> tuple[dict[str, float], float, dict[str, Any]]:
        """One ``sessiond flush``; the CLI's own CPU counts as the scheduler's (``flush``)."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        used, wall, out = self.costed(lambda: self.sessiond_cli("flush"))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        used["flush"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        return used, wall, out


def summary(
    used: dict[str, float], wall: float, n: int, wal_bytes: int | None = None, **extra: Any
) -> dict[str, Any]:
    wrk, pg = extra.get("wrk"), extra.get("pg")  # wrk's answer, the phase's ``growth``
    out: dict[str, Any] = {"units": n, "wall_s": round(wall, 1), "per_s": round(n / wall),
                           "cpu_per_1k": per_k(used, n), "pg_per_unit": pg}  # fmt: skip
    if wal_bytes is not None:
        out["wal_bytes_per_unit"] = round(wal_bytes / n, 1)
    if wrk is not None:
        out.update({k: wrk[k] for k in ("rps", "p50_ms", "p99_ms", "non_2xx")})
    return out


def per_k(used: dict[str, float], n: int) -> dict[str, float]:
    return {k: round(v / n * 1000, 3) for k, v in used.items()}


def growth(a: dict[str, dict[str, int]], b: dict[str, dict[str, int]], n: int) -> dict[str, Any]:
    """Per unit of work: bytes on disk added, rows added, row data added, by table; and each
    table's mean row data size (without the 28-byte tuple header and line pointer)."""
    out: dict[str, Any] = {}
    for t, after in b.items():
        d = {k: after[k] - a.get(t, {}).get(k, 0) for k in ("bytes", "rows", "data")}
        if any(d.values()):
            out[t] = {k: round(v / n, 3) for k, v in d.items()}
            out[t]["row_bytes"] = round(after["data"] / after["rows"]) if after["rows"] else 0
    out["total_bytes"] = round(sum(v["bytes"] for v in out.values()), 1)
    return out


def seed_events(users: list[str], kinds: list[str], t0: datetime) -> list[bytes]:
    """Seed-form events (one implicit session per user), ``kinds`` in turn for every user."""
    return [json.dumps(event(kind, u, None, t0 + timedelta(milliseconds=k))).encode()
            for k, kind in enumerate(kinds) for u in users]  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    cap = Capacity(args, env=stage_cluster.cluster_env(args) if args.cluster else None)
    users = [f"cap-{i:07d}" for i in range(args.users)]
    sample = users[:: max(1, len(users) // 200)]
    out: dict[str, Any] = {"load_average": {"start": harness.load_average()}}
    try:
        cap.start()
        cap.roots = out["roots"] = server_roots(cap, args.cluster)
        cap.measure_idle(args.idle_s)
        out["idle_cpu_pct"] = {k: round(v * 100, 1) for k, v in cap.idle.items() if k in SERVERS}
        t0 = datetime.now(UTC) - timedelta(minutes=10)
        # 1. logins: everyone connected
        s0, r0, lsn = cap.sizes(), cap.redis_info("used_memory"), cap.wal()
        used, wall = cap.pipeline(seed_events(users, ["connected"], t0))
        s1, r1 = cap.sizes(), cap.redis_info("used_memory")
        out["logins"] = summary(used, wall, len(users), wal_bytes=cap.wal() - lsn)
        out["per_user"] = {"pg": growth(s0, s1, len(users)),
                           "redis_used_memory": round((r1 - r0) / len(users), 1),
                           "redis_memory_usage": cap.redis_key_bytes(sample)}  # fmt: skip
        # 2. churn: a logout and a login per user per round, everyone ends connected
        kinds = ["disconnected", "connected"] * args.rounds
        bodies = seed_events(users, kinds, t0 + timedelta(seconds=1))
        lsn = cap.wal()
        used, wall = cap.pipeline(bodies)
        n = len(bodies)
        out["churn"] = summary(
            used, wall, n, wal_bytes=cap.wal() - lsn, pg=growth(s1, cap.sizes(), n)
        )
        out["churn"]["redis_memory_usage"] = cap.redis_key_bytes(sample)
        # 3. /auth/check cache hits, then the flush that stores what they left in Redis
        empty, _, _ = cap.flush()  # start-up cost of the CLI, which the scheduler does not pay
        s3, lsn = cap.sizes(), cap.wal()
        used, wall, w = cap.requests(users, args.requests)
        done = int(w["requests"] or args.requests)
        fused, _, fl = cap.flush()
        fused["flush"] = max(0.0, fused["flush"] - empty["flush"])
        out["auth_hit"] = summary(used, wall, done, wal_bytes=cap.wal() - lsn,
                                  pg=growth(s3, cap.sizes(), done), wrk=w)  # fmt: skip
        out["auth_hit"]["flush_cpu_per_1k"] = per_k(fused, done)
        out["auth_hit"]["flush"] = {k: fl.get(k) for k in ("activity_entries", "access_entries")}
        # 4. the PostgreSQL fallback: nothing cached, each user once
        if args.miss:
            cap.redis(lambda c: c.flushdb())
            used, wall, w = cap.requests(users, len(users))
            done = int(w["requests"] or len(users))
            out["auth_miss"] = summary(used, wall, done, wrk=w)
        out["load_average"]["end"] = harness.load_average()
    finally:
        cap.stop()
        cap.loop.close()
    return out


def derive(res: dict[str, Any]) -> dict[str, Any]:
    """The per-core rates docs/capacity.md sizes from: units per CPU second."""
    out: dict[str, Any] = {}
    for name, phase, server in (("auth_rps_per_api_core", "auth_hit", "api"),
                                ("miss_rps_per_api_core", "auth_miss", "api"),
                                ("events_per_s_per_worker_core", "churn", "worker"),
                                ("events_per_s_per_ingress_core", "churn", "ingress")):  # fmt: skip
        cpu = res.get(phase, {}).get("cpu_per_1k", {}).get(server)
        out[name] = round(1000 / cpu) if cpu else None
    return out


def render(res: dict[str, Any]) -> str:
    rows = [["CPU s per 1,000", *SERVERS, "flush", "redis_cmds"]]
    phases = [("logins (events)", res["logins"]["cpu_per_1k"]),
              ("logout+login churn (events)", res["churn"]["cpu_per_1k"]),
              ("/auth/check hits (requests)", res["auth_hit"]["cpu_per_1k"]),
              ("  + their flush", res["auth_hit"]["flush_cpu_per_1k"])]  # fmt: skip
    if "auth_miss" in res:
        phases.append(("/auth/check PG fallback", res["auth_miss"]["cpu_per_1k"]))
    for name, c in phases:
        rows.append([name, *(f"{c.get(k, 0):.4g}" for k in (*SERVERS, "flush", "redis_cmds"))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    d, pu = res["derived"], res["per_user"]
    lines += [
        "",
        f"/auth/check hits per API core-second: {d['auth_rps_per_api_core']}; PG fallback: "
        f"{d['miss_rps_per_api_core']}",
        f"events per worker core-second: {d['events_per_s_per_worker_core']}; per ingress "
        f"core-second: {d['events_per_s_per_ingress_core']}",
        f"per connected user: Redis used_memory {pu['redis_used_memory']} B, MEMORY USAGE "
        f"{pu['redis_memory_usage']}; PostgreSQL {pu['pg']['total_bytes']} B",
        f"per churn event: PostgreSQL {res['churn']['pg_per_unit']['total_bytes']} B, "
        f"WAL {res['churn']['wal_bytes_per_unit']} B",
        f"per /auth/check: PostgreSQL {res['auth_hit']['pg_per_unit']['total_bytes']} B, "
        f"WAL {res['auth_hit']['wal_bytes_per_unit']} B",
        f"load average: {res['load_average']}",
    ]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.capacity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--name", default="sessiond_capacity", help="vhost and database")
    for flag, default, what in (("--redis-db", 9, "Redis db"), ("--workers", 2, "API workers"),
                                ("--processes", 2, "partition worker processes"),
                                ("--threads", 8, "their threads"), ("--connections", 32, "wrk's"),
                                ("--users", 5000, "connected users"),
                                ("--rounds", 2, "logout+login rounds per user"),
                                ("--requests", 50_000, "cache hits"), ("--idle-s", 5, "idle s"),
                                ("--timeout", 180, "bound of each phase (s)")):  # fmt: skip
        p.add_argument(flag, type=int, default=default, help=what)
    p.add_argument("--no-miss", dest="miss", action="store_false", help="skip phase 4")
    p.add_argument("--cluster", action="store_true", help="on the local cluster")
    p.add_argument("--json-out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    harness.RESULTS.mkdir(exist_ok=True)
    started = time.monotonic()
    res: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
        "cluster": args.cluster, "settings": {k: str(v) for k, v in vars(args).items()},
    }  # fmt: skip
    res.update(run(args))
    res["derived"] = derive(res)
    res["total_s"] = round(time.monotonic() - started, 1)
    res["table"] = render(res)
    name = "capacity_cluster.json" if args.cluster else "capacity.json"
    (args.json_out or harness.RESULTS / name).write_text(json.dumps(res, indent=2))
    say(f"{res['table']}\ntotal {res['total_s']} s")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
