"""Soak: sessiond under sustained load through a PostgreSQL outage and a Redis restart.

``python -m loadtests.soak --minutes 10``: in a private namespace of the local stack it starts
``sessiond api``, ``worker`` and ``scheduler``, connects a pool of users, measures the maximum
``/auth/check`` rate this client gets (closed loop), then sends about 80 % of it (valid tokens, a
share of tokens of unknown users, a share of forged ones) plus a stream of login/logout events.
At 30 % of the run PostgreSQL is stopped for ``--outage-s`` (60 s for 10 minutes, scaled by
default); at 65 % Redis is shut down saving its data and started again. Every second it samples
requests/s, p50/p99, each process's RSS, Redis ``used_memory``, the access-log backlog and the
audit rows written; at the end it waits for the backlog to drain and checks that nothing was
lost: every 200/403 the client saw is an audit row (or counted as overflow), every 401 is in a
refused-token count, every event was applied. Figures: one PNG per measure (``--out``).

The machine's PostgreSQL and Redis of *this* stack are stopped and restarted: run it on your own
stack only (the env file's ports), never while tests use that stack.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import queue
import random
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import redis

from loadtests import harness, soak_report
from loadtests.bench.tools import Publisher, event, token
from loadtests.soak_client import run_load
from sessiond import stack
from storage.activity import ACCESS_LOG_KEY

DOCS = harness.ROOT / "docs" / "soak"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--outage-s", type=float, help="PostgreSQL outage (default 6 s per minute)")
    p.add_argument("--redis-gap-s", type=float, default=3.0, help="Redis down between restarts")
    p.add_argument("--load-share", type=float, default=0.8, help="of the measured max rate")
    p.add_argument("--forged-share", type=float, default=0.2)
    p.add_argument("--unknown-share", type=float, default=0.05, help="valid tokens, no session")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--probe-s", type=float, default=10.0)
    p.add_argument("--events-per-s", type=float, default=20.0)
    p.add_argument("--api-workers", type=int, default=1)
    p.add_argument("--redis-db", type=int, default=7)
    p.add_argument("--name", default="sessiond_soak")
    p.add_argument("--out", type=Path, default=DOCS, help="where the PNGs go")
    return p.parse_args(argv)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.env = harness.private_env(args.name, args.redis_db)
        self.settings = harness.settings_from(self.env)
        self.cfg = stack.StackConfig.from_env()
        self.logs = harness.RESULTS / "soak_logs"
        self.procs: list[harness.Proc] = []
        self.port = 0
        self.samples: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.published = 0
        self._stop_events = threading.Event()
        self.t0 = 0.0

    # ------------------------------------------------------------------ set-up
    def start(self) -> None:
        asyncio.run(harness.reset(self.settings))
        self.port = harness.free_port()
        api = ["api", "--workers", str(self.args.api_workers), "--port", str(self.port)]
        for name, argv in (
            ("api", api),
            ("worker", ["worker", "--processes", "1", "--threads", "4"]),
            ("scheduler", ["scheduler"]),
        ):
            self.procs.append(harness.sessiond(name, argv, self.env, self.logs).start())
        harness.wait_http(f"http://127.0.0.1:{self.port}/health/ready", self.procs[0])

    def connect_users(self) -> None:
        pub = Publisher(self.settings)
        at = datetime.now(UTC) - timedelta(seconds=5)
        try:
            for i in range(self.args.users):
                pub.publish(event("connected", f"soak-{i}", None, at))
        finally:
            pub.close()
        self.published += self.args.users
        harness.wait_for(
            lambda: (
                self.pg("SELECT count(*) FROM users WHERE status = 'connected'") == self.args.users
            ),
            timeout=120,
            what="users connected",
            interval=0.5,
        )

    def tokens(self) -> list[str]:
        a = self.args
        out: list[str] = []
        for i in range(5000):
            roll = random.random()
            if roll < a.forged_share:
                forged = {"sub": f"soak-{i}", "exp": int(time.time()) + 7200}
                out.append(jwt.encode(forged, "not-the-secret-" * 4, algorithm="HS256"))
            elif roll < a.forged_share + a.unknown_share:
                out.append(token(self.settings, f"nobody-{i}", ttl=7200))
            else:
                out.append(token(self.settings, f"soak-{i % a.users}", ttl=7200))
        return out

    # ------------------------------------------------------------------ probes
    def pg(self, sql: str) -> Any:
        async def run() -> Any:
            conn = await asyncpg.connect(self.settings.database_url, timeout=2)
            try:
                return await conn.fetchval(sql)
            finally:
                await conn.close()

        try:
            return asyncio.run(run())
        except (OSError, asyncpg.PostgresError, TimeoutError, asyncpg.InterfaceError):
            return None

    def sample(self, client: redis.Redis, second: dict[str, Any] | None) -> dict[str, Any]:
        s: dict[str, Any] = {"t": round(time.time() - self.t0, 1)}
        if second is not None:
            statuses = second["statuses"]
            s.update(
                req_s=second["requests"],
                req_200=statuses.get("200", 0),
                req_401=statuses.get("401", 0),
                req_403=statuses.get("403", 0),
                req_503=statuses.get("503", 0),
                p50_ms=second["p50_ms"],
                p99_ms=second["p99_ms"],
            )
        try:
            s["redis_mib"] = round(int(client.info("memory")["used_memory"]) / 2**20, 1)
            s["backlog"] = int(client.llen(ACCESS_LOG_KEY))
        except (redis.RedisError, OSError):
            s["redis_mib"] = s["backlog"] = None
        s["audit_rows"] = self.pg("SELECT last_value FROM audit_events_id_seq")
        rss: dict[str, float] = {}
        for proc in self.procs:
            for i, pid in enumerate([proc.pid, *harness.descendants(proc.pid)]):
                value = harness.rss_mib(pid)
                if value is not None:
                    rss[proc.name if i == 0 else f"{proc.name}.{i}"] = value
        s["rss"] = rss
        return s

    # ------------------------------------------------------------------ load and faults
    def publish_events(self) -> None:
        pub = Publisher(self.settings)
        n = 0
        try:
            while not self._stop_events.is_set():
                user = f"ev-{n % 300}"
                kind = "connected" if (n // 300) % 2 == 0 else "disconnected"
                pub.publish(event(kind, user, None, datetime.now(UTC)))
                n += 1
                self.published += 1
                time.sleep(1.0 / self.args.events_per_s)
        finally:
            pub.close()

    def faults(self, total_s: float, outage_s: float) -> None:
        def at(fraction: float) -> None:
            time.sleep(max(0.0, self.t0 + fraction * total_s - time.time()))

        at(0.30)
        start = time.time() - self.t0
        stack.stop(self.cfg, "postgres")
        time.sleep(outage_s)
        stack.start(self.cfg, "postgres")
        self.events.append(
            {"name": "PostgreSQL stopped", "start": start, "end": time.time() - self.t0}
        )
        at(0.65)
        start = time.time() - self.t0
        admin = redis.Redis(port=self.cfg.redis_port)
        with contextlib.suppress(redis.ConnectionError, redis.ResponseError):
            admin.shutdown(save=True)  # data kept: the RDB is written, then loaded at start
        time.sleep(self.args.redis_gap_s)
        stack.start(self.cfg, "redis")
        self.events.append(
            {
                "name": "Redis restarted",
                "start": start,
                "end": time.time() - self.t0,
                "color": "orange",
            }
        )

    def load(self, tokens: list[str], rate: float, seconds: float, out: Any) -> Any:
        done: multiprocessing.Queue[Any] = multiprocessing.Queue()
        proc = multiprocessing.Process(
            target=run_load,
            args=(self.port, tokens, self.args.connections, rate, seconds, out, done),
        )
        proc.start()
        return proc, done

    def run(self) -> dict[str, Any]:
        a = self.args
        total_s = a.minutes * 60
        outage_s = a.outage_s if a.outage_s is not None else 6.0 * a.minutes
        tokens = self.tokens()
        probe, probe_done = self.load(tokens, 0, a.probe_s, None)
        probed = probe_done.get(timeout=a.probe_s + 60)
        max_rate = float(probed["rate"])
        probe.join()
        target = a.load_share * max_rate
        print(f"max rate {max_rate:.0f} req/s; soak at {target:.0f} req/s for {total_s:.0f} s")
        seconds: multiprocessing.Queue[Any] = multiprocessing.Queue()
        self.t0 = time.time()
        loader, load_done = self.load(tokens, target, total_s, seconds)
        publisher = threading.Thread(target=self.publish_events, daemon=True)
        publisher.start()
        faults = threading.Thread(target=self.faults, args=(total_s, outage_s), daemon=True)
        faults.start()
        client = redis.Redis(port=self.cfg.redis_port, db=a.redis_db, socket_timeout=1)
        totals: dict[str, Any] | None = None
        while totals is None:
            time.sleep(1.0)
            latest = None
            while True:
                try:
                    latest = seconds.get_nowait()
                except queue.Empty:
                    break
            self.samples.append(self.sample(client, latest))
            try:
                totals = load_done.get_nowait()
            except queue.Empty:
                totals = None
        loader.join()
        self._stop_events.set()
        publisher.join()
        faults.join()
        self.drain(client)
        for status, n in probed["totals"].items():  # the probe's decisions are journaled too
            totals["totals"][status] = totals["totals"].get(status, 0) + n
        return self.check(max_rate, target, totals)

    def drain(self, client: redis.Redis) -> None:
        """Samples on until the backlog is gone and every event is applied (3 minutes at most)."""
        deadline = time.time() + 180
        while time.time() < deadline:
            self.samples.append(self.sample(client, None))
            applied = self.pg("SELECT count(*) FROM processed_events")
            if self.samples[-1]["backlog"] == 0 and applied == self.published:
                break
            time.sleep(1.0)
        asyncio.run(final_flush(self.settings))

    def check(self, max_rate: float, target: float, totals: dict[str, Any]) -> dict[str, Any]:
        c = {int(k): v for k, v in totals["totals"].items()}
        rows = {
            "granted": self.pg(
                "SELECT count(*) FROM audit_events WHERE kind = 'access'"
                " AND detail->>'decision' = 'granted'"
            ),
            "forbidden": self.pg(
                "SELECT count(*) FROM audit_events WHERE kind = 'access'"
                " AND detail->>'decision' = 'forbidden'"
            ),
            "refused": self.pg(
                "SELECT coalesce(sum((detail->>'count')::int), 0) FROM audit_events"
                " WHERE detail->>'decision' = 'invalid_token'"
            ),
            "refused_rows": self.pg(
                "SELECT count(*) FROM audit_events WHERE detail->>'decision' = 'invalid_token'"
            ),
            "overflow": self.pg(
                "SELECT coalesce(sum((detail->>'dropped')::int), 0)"
                " FROM audit_events WHERE kind = 'access_log_overflow'"
            ),
        }
        decided = c.get(200, 0) + c.get(403, 0)
        journaled = rows["granted"] + rows["forbidden"] + rows["overflow"]
        applied = self.pg("SELECT count(*) FROM processed_events")
        check = {
            "client 200 / 403 / 401 / 503": f"{c.get(200, 0)} / {c.get(403, 0)} /"
            f" {c.get(401, 0)} / {c.get(503, 0)} (connection errors {totals['errors']})",
            "audit rows granted / forbidden / overflow counted": f"{rows['granted']} /"
            f" {rows['forbidden']} / {rows['overflow']}",
            "refused tokens in counts (rows)": f"{rows['refused']} ({rows['refused_rows']})",
            "no decision lost (rows + overflow >= 200s + 403s)": journaled >= decided,
            "every 401 counted (counts >= 401s)": rows["refused"] >= c.get(401, 0),
            "every event applied": applied == self.published,
            "backlog drained": self.samples[-1].get("backlog") == 0,
        }
        first = self.samples[min(5, len(self.samples) - 1)]["rss"]
        peak: dict[str, float] = {}
        for s in self.samples:
            for k, v in s["rss"].items():
                peak[k] = max(peak.get(k, 0.0), v)
        return {
            "max_rate": max_rate,
            "target_rate": target,
            "events_published": self.published,
            "events_applied": applied,
            "rss_first": first,
            "rss_peak": peak,
            "rss_last": self.samples[-1]["rss"],
            "check": check,
            "ok": all(v is True for v in check.values() if isinstance(v, bool)),
        }

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


async def final_flush(settings: Any) -> None:
    """The refused-token counts of the last minutes are journaled once those minutes end; the
    soak does not wait for that: it journals them now, as the flush would two minutes later."""
    from storage import db as db_mod
    from storage import flush
    from storage.activity import AccessLog
    from storage.redis_conn import connect

    await db_mod.open_db(settings)
    client = connect(settings)
    try:
        result = flush.FlushResult()
        await flush.drain_access_log(
            AccessLog(client), db_mod.conn(), result, batch_size=5000, now=time.time() + 130
        )
    finally:
        await client.aclose()
        await db_mod.close_db()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    soak = Soak(args)
    try:
        soak.start()
        soak.connect_users()
        summary = soak.run()
    finally:
        soak.stop()
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "summary": summary,
        "events": soak.events,
        "samples": soak.samples,
        "load": harness.load_average(),
    }
    (harness.RESULTS / "soak.json").write_text(json.dumps(record, indent=1, default=str))
    soak_report.plot(soak.samples, soak.events, args.out)
    text = soak_report.table(soak.samples, summary)
    (harness.RESULTS / "soak.md").write_text(text)
    print(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
