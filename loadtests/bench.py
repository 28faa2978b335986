"""The benchmark: each figure of issue 5 beside its limit, measured in one run on this machine.

    .venv/bin/python -m loadtests.bench [--quick] [--profile] [--only 1,2,3,4,5]

1. ``/auth/check`` on a cache hit (requests/s, p50, p99) against a bare Sanic route returning
   200, same number of workers, same load tool (``wrk -t1 -c64 -d10s --latency``); target ratio
   >= 0.7. Then the revocation delay: publish ``disconnected`` → first 403 (median <= 100 ms).
2. Events applied per second end to end (publish → committed in PostgreSQL) against raw pika
   publish + consume + ack of the same messages on the same broker; target ratio >= 0.5.
3. PostgreSQL row updates caused by 100,000 granted requests from 1,000 users across 2 flushes
   (pg_stat_user_tables deltas; target <= 2,000).
4. Expiry sweep seconds for 1,000,000 connected / 100,000 stale users (``bench_expiry.py``).
5. Redis memory per 100,000 cached users; RSS of one API worker and one worker process.

Everything runs on 127.0.0.1 in a namespace of its own (vhost and database ``sessiond_bench5``,
Redis db 12), API and workers started as ``sessiond api`` / ``sessiond worker`` would. Prints a
readable table on stderr and one JSON document on stdout (also written to
``results/bench.json``). ``--profile`` samples the API (stage 1) and the workers (stage 2) with
py-spy and adds their hottest frames; profiling perturbs the figures, so run it separately.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import jwt
import pika
import redis.asyncio as aioredis

from loadtests import bench_expiry, harness
from sessiond import amqp, stack
from sessiond.config import Settings
from storage import cache as cache_mod

T = TypeVar("T")

TARGETS = {
    "auth_check_ratio": 0.7,
    "revocation_median_ms": 100.0,
    "events_ratio": 0.5,
    "row_updates": 2000,
}

BARE_APP = """
from sanic import HTTPResponse, Request, Sanic


def create_app() -> Sanic:
    app = Sanic("bare")
    app.config.ACCESS_LOG = False
    app.config.MOTD = False

    @app.get("/ok")
    async def ok(request: Request) -> HTTPResponse:
        return HTTPResponse(status=200)

    return app
"""

# One thread, tokens taken in turn; after BENCH_REQUESTS answers it stops sending and writes
# BENCH_DONE, upon which the bench interrupts wrk (which otherwise sleeps its whole -d).
WRK_TOKENS_LUA = """
local tokens = {}
for line in io.lines(os.getenv("BENCH_TOKENS")) do tokens[#tokens + 1] = line end
local target = tonumber(os.getenv("BENCH_REQUESTS"))
local i, done = 0, 0
request = function()
  i = i % #tokens + 1
  return wrk.format("GET", "/auth/check", {["Authorization"] = "Bearer " .. tokens[i]})
end
response = function(status, headers, body)
  done = done + 1
  if done == target then
    wrk.thread:stop()
    local marker = io.open(os.getenv("BENCH_DONE"), "w")  -- tells the bench to end wrk (SIGINT)
    marker:close()
  end
end
"""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Loop:
    """One event loop for the benchmark's own asyncio calls (asyncpg, redis) from sync code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.loop.close()


# --------------------------------------------------------------------------- tools


def parse_duration_ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def wrk(
    url: str,
    *,
    seconds: int,
    connections: int,
    header: str | None = None,
    script: Path | None = None,
    env: dict[str, str] | None = None,
    watch: dict[str, list[int]] | None = None,
    done_marker: Path | None = None,
) -> dict[str, Any]:
    """Runs wrk; returns requests/s, p50/p99 (ms), non-2xx answers, and the CPU use (% of one
    core) of wrk itself and of the ``watch`` processes during the run."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if header:
        argv += ["-H", header]
    if script:
        argv += ["-s", str(script)]
    argv.append(url)
    watched = {
        name: {pid: harness.cpu_seconds(pid) for pid in pids}
        for name, pids in (watch or {}).items()
    }
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    assert proc.stdout is not None
    if done_marker is not None:
        harness.wait_for(done_marker.exists, timeout=seconds, what="wrk script", interval=0.05)
        proc.send_signal(signal.SIGINT)  # wrk prints its report on SIGINT
    text = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    wall = time.monotonic() - started
    out: dict[str, Any] = {"wall_s": round(wall, 2)}
    if proc.returncode != 0 or "Requests/sec" not in text:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
    out["rps"] = round(float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)))  # type: ignore[union-attr]
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        out[f"p{pct}_ms"] = round(parse_duration_ms(m.group(1), m.group(2)), 2) if m else None
    m = re.search(r"(\d+) requests in", text)
    out["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)", text)
    out["socket_errors"] = m.group(1).strip() if m else None
    out["wrk_cpu_pct"] = round((usage.ru_utime + usage.ru_stime) / wall * 100)
    for name, pids in watched.items():
        used = sum(harness.cpu_seconds(pid) - before for pid, before in pids.items())
        out[f"{name}_cpu_pct"] = round(used / wall * 100)
    return out


class Http:
    """A keep-alive HTTP/1.1 client for precise single-request timing."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

    def status(self, path: str, token: str) -> int:
        self.conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        resp = self.conn.getresponse()
        resp.read()
        return int(resp.status)

    def until(self, path: str, token: str, status: int, timeout: float = 10.0) -> float:
        """Seconds until ``path`` answers ``status``; raises after ``timeout``."""
        started = time.perf_counter()
        while self.status(path, token) != status:
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"{path} never answered {status} within {timeout}s")
        return time.perf_counter() - started

    def close(self) -> None:
        self.conn.close()


class Publisher:
    """The auth service's side: persistent JSON, publisher confirms."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.conn = pika.BlockingConnection(amqp.connection_parameters(settings))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()

    def publish(self, body: dict[str, Any]) -> None:
        self.ch.basic_publish(
            self.settings.events_exchange,
            "auth.bench",
            json.dumps(body).encode(),
            pika.BasicProperties(delivery_mode=2),
            mandatory=True,
        )

    def close(self) -> None:
        if self.conn.is_open:
            self.conn.close()


def publish_batches(
    settings: Settings, exchange: str, routing_key: str, bodies: list[bytes], *, batch: int = 500
) -> float:
    """Bulk publishing in AMQP transactions (one round trip per batch, every committed batch
    stored), exactly as for the raw baseline; returns the seconds it took."""
    started = time.perf_counter()
    conn = pika.BlockingConnection(amqp.connection_parameters(settings))
    try:
        ch = conn.channel()
        ch.tx_select()
        props = pika.BasicProperties(delivery_mode=2)
        for i, body in enumerate(bodies, 1):
            ch.basic_publish(exchange, routing_key, body, props)
            if i % batch == 0:
                ch.tx_commit()
        ch.tx_commit()
    finally:
        conn.close()
    return time.perf_counter() - started


def token(settings: Settings, sub: str, sid: str | None = None, ttl: int = 3600) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + ttl}
    if sid is not None:
        claims["sid"] = sid
    return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")


def event(kind: str, user_id: str, session_id: str | None, at: datetime) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event": kind,
        "user_id": user_id,
        "event_id": uuid.uuid4().hex,
        "occurred_at": at.isoformat(),
    }
    if session_id is not None:
        body["session_id"] = session_id
    if kind == "connected":
        body["name"] = f"Bench {user_id}"
        body["email"] = f"{user_id}@bench.example.com"
    return body


@contextlib.contextmanager
def profiled(pid: int, seconds: float, out: Path, enabled: bool) -> Iterator[dict[str, Any]]:
    """py-spy on ``pid`` and its subprocesses for ``seconds`` (non-blocking sampling)."""
    result: dict[str, Any] = {}
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    proc = None
    if enabled and Path(spy).exists():
        proc = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate", "100",
             "--duration", str(int(seconds)), "--format", "raw", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        yield result
    finally:
        if proc is not None:
            proc.wait(timeout=seconds + 30)
            result.update(hotspots(out))


def hotspots(path: Path, top: int = 12) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    if not path.exists():
        return {"error": "py-spy wrote nothing (is ptrace allowed?)"}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r"\s*\(.*?/(site-packages|work/main)/", " (", f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith("process ")]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "self_pct": {f: round(100 * n / total, 1) for f, n in own.most_common(top)},
        "inclusive_pct": {f: round(100 * n / total, 1) for f, n in inclusive.most_common(top * 2)},
        "raw": str(path),
    }


def redis_pids() -> list[int]:
    pidfile = stack.StackConfig.from_env().pidfile("redis")
    with contextlib.suppress(OSError, ValueError):
        return [int(pidfile.read_text().strip())]
    return []


def rss_of(proc: harness.Proc) -> dict[str, Any]:
    """RSS (MiB) of the main process and of each child doing the work."""
    kids = [
        pid
        for pid in harness.descendants(proc.pid)
        if "resource_tracker" not in harness.cmdline(pid)
    ]
    return {"main": harness.rss_mib(proc.pid), "children": [harness.rss_mib(p) for p in kids]}


# --------------------------------------------------------------------------- stages


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.env = harness.private_env(args.name, args.redis_db)
        self.settings = harness.settings_from(self.env)
        self.loop = Loop()
        self.logs = harness.RESULTS / "bench_logs"
        self.api: harness.Proc | None = None
        self.worker: harness.Proc | None = None
        self.api_port = 0
        self.out: dict[str, Any] = {}

    # -- processes
    def start(self) -> None:
        self.loop.run(harness.reset(self.settings))
        self.api_port = harness.free_port()
        self.api = harness.sessiond(
            "api",
            ["api", "--workers", str(self.args.workers), "--port", str(self.api_port)],
            self.env,
            self.logs,
        ).start()
        self.worker = harness.sessiond(
            "worker",
            [
                "worker",
                "--processes",
                str(self.args.processes),
                "--threads",
                str(self.args.threads),
            ],
            self.env,
            self.logs,
        ).start()
        harness.wait_http(f"http://127.0.0.1:{self.api_port}/health/ready", self.api, timeout=60)

    def stop(self) -> None:
        for proc in (self.api, self.worker):
            if proc is not None:
                proc.stop()

    def processed(self) -> int:
        async def count() -> int:
            conn = await asyncpg.connect(self.settings.database_url)
            try:
                return int(await conn.fetchval("SELECT count(*) FROM processed_events"))
            finally:
                await conn.close()

        return self.loop.run(count())

    def sessiond_cli(self, *args: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "sessiond.cli", *args],
            env={**os.environ, **self.env}, cwd=harness.ROOT, capture_output=True, text=True,
            timeout=300, check=True,
        )  # fmt: skip
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    # -- 1
    def auth_check(self) -> dict[str, Any]:
        """Both servers run side by side; wrk alternates between them (``--rounds`` rounds of
        ``--duration`` seconds each) and the best round of each counts, so that a burst of
        load from elsewhere on a shared machine does not decide the ratio alone."""
        a = self.args
        assert self.api is not None
        url = f"http://127.0.0.1:{self.api_port}"
        res: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "bare_app.py").write_text(BARE_APP)
            port = harness.free_port()
            bare = harness.Proc(
                "bare",
                [sys.executable, "-m", "sanic", "bare_app:create_app", "--factory",
                 "--host", "127.0.0.1", "--port", str(port), "--workers", str(a.workers),
                 "--no-motd"],
                {"PYTHONPATH": tmp},
                self.logs / "bare.log",
            )  # fmt: skip
            bare.start()
            try:
                harness.wait_http(f"http://127.0.0.1:{port}/ok", bare, timeout=60)
                res.update(self._auth_check_rounds(url, f"http://127.0.0.1:{port}/ok", bare))
            finally:
                bare.stop()
        res["ratio"] = round(res["auth_check"]["rps"] / res["bare"]["rps"], 3)
        res.update(self._revocation())
        return res

    def _auth_check_rounds(self, url: str, bare_url: str, bare: harness.Proc) -> dict[str, Any]:
        a = self.args
        assert self.api is not None
        pub = Publisher(self.settings)
        http = Http(self.api_port)
        try:
            # A connected user, through the real pipeline; its token then hits the cache.
            pub.publish(event("connected", "bench-hit", "web", datetime.now(UTC)))
            hit = token(self.settings, "bench-hit", "web")
            http.until("/auth/check", hit, 200)
        finally:
            http.close()
            pub.close()
        header = f"Authorization: Bearer {hit}"
        api_pids = [self.api.pid, *harness.descendants(self.api.pid)]
        bare_pids = [bare.pid, *harness.descendants(bare.pid)]
        wrk(f"{url}/auth/check", seconds=2, connections=a.connections, header=header)  # warm-up
        wrk(bare_url, seconds=2, connections=a.connections)
        rounds: dict[str, list[dict[str, Any]]] = {"auth_check": [], "bare": []}
        prof: dict[str, Any] = {}
        for i in range(a.rounds):
            with profiled(
                self.api.pid,
                a.duration,
                harness.RESULTS / "profile_api.txt",
                a.profile and i == 0,
            ) as prof_round:
                rounds["auth_check"].append(
                    wrk(
                        f"{url}/auth/check",
                        seconds=a.duration,
                        connections=a.connections,
                        header=header,
                        watch={"server": api_pids, "redis": redis_pids()},
                    )
                )
            prof = prof or prof_round
            rounds["bare"].append(
                wrk(
                    bare_url,
                    seconds=a.duration,
                    connections=a.connections,
                    watch={"server": bare_pids},
                )
            )
        res: dict[str, Any] = {
            name: max(runs, key=lambda r: int(r["rps"])) for name, runs in rounds.items()
        }
        res["rounds"] = {name: [r["rps"] for r in runs] for name, runs in rounds.items()}
        if prof:
            res["profile_api"] = prof
        res["rss_api_after_load"] = rss_of(self.api)
        return res

    def _revocation(self) -> dict[str, Any]:
        """``disconnected`` published (confirmed) → first 403 seen by a client polling at once."""
        pub = Publisher(self.settings)
        http = Http(self.api_port)
        delays: list[float] = []
        grants: list[float] = []
        try:
            for i in range(self.args.revocations):
                uid = f"bench-rev-{i}"
                tok = token(self.settings, uid, "web")
                at = datetime.now(UTC)
                started = time.perf_counter()
                pub.publish(event("connected", uid, "web", at))
                http.until("/auth/check", tok, 200)
                grants.append((time.perf_counter() - started) * 1000)
                for _ in range(20):  # a few cache hits, as a live user would have
                    http.status("/auth/check", tok)
                started = time.perf_counter()
                pub.publish(event("disconnected", uid, "web", at + timedelta(seconds=1)))
                http.until("/auth/check", tok, 403)
                delays.append((time.perf_counter() - started) * 1000)
        finally:
            http.close()
            pub.close()
        return {
            "revocation_ms": {
                "trials": len(delays),
                "median": round(statistics.median(delays), 1),
                "p90": round(sorted(delays)[int(0.9 * (len(delays) - 1))], 1),
                "max": round(max(delays), 1),
            },
            "grant_ms_median": round(statistics.median(grants), 1),
        }

    # -- 2
    def events(self) -> dict[str, Any]:
        a = self.args
        assert self.worker is not None
        # Per user: web connects first and stays, mobile toggles; every user ends connected
        # (on web at least), which stage 3 relies on.
        t0 = datetime.now(UTC)
        bodies: list[bytes] = []
        for k in range(a.events_per_user):
            for u in range(a.event_users):
                uid = f"bench-ev-{u}"
                at = t0 + timedelta(milliseconds=k)
                if k == 0:
                    body = event("connected", uid, "web", at)
                elif k % 2:
                    body = event("connected", uid, "mobile", at)
                else:
                    body = event("disconnected", uid, "mobile", at)
                bodies.append(json.dumps(body).encode())
        n = len(bodies)
        res: dict[str, Any] = {"events": n, "users": a.event_users}

        base = self.processed()
        with profiled(
            self.worker.pid, a.profile_s, harness.RESULTS / "profile_worker.txt", a.profile
        ) as prof:
            started = time.perf_counter()
            worker_pids = [self.worker.pid, *harness.descendants(self.worker.pid)]
            cpu_before = {p: harness.cpu_seconds(p) for p in worker_pids}
            res["publish_s"] = round(
                publish_batches(self.settings, self.settings.events_exchange, "auth.bench", bodies),
                2,
            )
            harness.wait_for(
                lambda: self.processed() >= base + n,
                timeout=a.events_timeout,
                what=f"{n} events applied",
                interval=0.05,
            )
            elapsed = time.perf_counter() - started
            used = sum(harness.cpu_seconds(p) - c for p, c in cpu_before.items())
        res["applied_s"] = round(elapsed, 2)
        res["events_per_s"] = round(n / elapsed)
        res["worker_cpu_pct"] = round(used / elapsed * 100)
        if prof:
            res["profile_worker"] = prof
        res["rss_worker_after_load"] = rss_of(self.worker)
        # Stage 3 counts PostgreSQL writes: no worker may write meanwhile, and their pooled
        # backends report pending statistics when they end.
        self.worker.stop()
        res["raw"] = self.raw_pika(bodies)
        res["ratio"] = round(res["events_per_s"] / res["raw"]["msgs_per_s"], 3)
        return res

    def raw_pika(self, bodies: list[bytes]) -> dict[str, Any]:
        """Publish (same transactions) + consume + ack per message, one consumer, same broker."""
        queue = "bench.raw"
        settings = self.settings
        with harness.amqp_channel(settings) as ch:
            ch.queue_delete(queue)
            ch.queue_declare(queue, durable=True)
        n = len(bodies)
        done = threading.Event()
        ready = threading.Event()
        finished: list[float] = []

        def consume() -> None:
            conn = pika.BlockingConnection(amqp.connection_parameters(settings))
            ch = conn.channel()
            ch.basic_qos(prefetch_count=100)
            seen = 0

            def on_message(c: Any, method: Any, _props: Any, _body: bytes) -> None:
                nonlocal seen
                c.basic_ack(method.delivery_tag)
                seen += 1
                if seen >= n:
                    finished.append(time.perf_counter())
                    c.stop_consuming()

            ch.basic_consume(queue, on_message)
            ready.set()
            ch.start_consuming()
            conn.close()
            done.set()

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        ready.wait(10)
        started = time.perf_counter()
        publish_s = publish_batches(settings, "", queue, bodies)
        if not done.wait(120):
            raise TimeoutError("raw consumer did not get every message")
        elapsed = finished[0] - started
        with harness.amqp_channel(settings) as ch:
            ch.queue_delete(queue)
        return {
            "publish_s": round(publish_s, 2),
            "s": round(elapsed, 2),
            "msgs_per_s": round(n / elapsed),
        }

    # -- 3
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

    # -- 5
    def redis_memory(self) -> dict[str, Any]:
        n = self.args.cache_users

        async def measure() -> dict[str, Any]:
            client = cache_mod.connect(self.settings)
            cache = cache_mod.Cache(client, ttl_s=self.settings.cache_ttl_s)
            try:
                await client.flushdb()
                before = int((await client.info("memory"))["used_memory"])
                now = datetime.now(UTC)
                for start in range(0, n, 1000):
                    async with client.pipeline(transaction=False) as pipe:
                        for i in range(start, min(n, start + 1000)):
                            snap = cache_mod.UserSnapshot(
                                user_id=f"user-{i:07d}", status="connected", version=3,
                                name=f"User {i}", email=f"user{i}@example.com", sessions=["web"],
                                connected_at=now, seen_at=now, last_activity_at=now,
                            )  # fmt: skip
                            await cache._sync(
                                keys=[cache_mod.user_key(snap.user_id),
                                      cache_mod.version_key(snap.user_id)],
                                args=[snap.version, snap.to_json(), cache.ttl_s],
                                client=pipe,
                            )  # fmt: skip
                        await pipe.execute()
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

    # -- 4
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


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("ok" if ok else "MISSED")


def table(out: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = [["#", "measure", "sessiond", "reference / limit", "ratio", "target"]]
    s1 = out.get("1")
    if s1:
        ac, bare = s1["auth_check"], s1["bare"]
        target = TARGETS["auth_check_ratio"]
        rows.append([
            "1", f"/auth/check cache hit, req/s (best of {len(s1['rounds']['bare'])})",
            f"{ac['rps']:,}", f"bare Sanic {bare['rps']:,}", f"{s1['ratio']:.2f}",
            f">= {target} {verdict(s1['ratio'] >= target)}",
        ])  # fmt: skip
        rows.append([
            "1", "  p50 / p99 ms", f"{ac['p50_ms']} / {ac['p99_ms']}",
            f"{bare['p50_ms']} / {bare['p99_ms']}", "", "",
        ])  # fmt: skip
        rows.append([
            "1", "  wrk CPU (one core = 100 %)", f"{ac['wrk_cpu_pct']} %",
            f"{bare['wrk_cpu_pct']} %", "", "",
        ])  # fmt: skip
        rows.append([
            "1", "  server CPU (2 cores = 200 %)",
            f"{ac.get('server_cpu_pct')} % + Redis {ac.get('redis_cpu_pct')} %",
            f"{bare.get('server_cpu_pct')} %", "", "",
        ])  # fmt: skip
        rv = s1["revocation_ms"]
        rows.append([
            "1", f"revocation delay ms (median of {rv['trials']})", f"{rv['median']}",
            f"p90 {rv['p90']}, max {rv['max']}", "",
            f"<= {TARGETS['revocation_median_ms']:.0f} "
            f"{verdict(rv['median'] <= TARGETS['revocation_median_ms'])}",
        ])  # fmt: skip
    s2 = out.get("2")
    if s2:
        rows.append([
            "2", f"events applied/s ({s2['events']:,} events, {s2['users']:,} users)",
            f"{s2['events_per_s']:,}", f"raw pika {s2['raw']['msgs_per_s']:,}",
            f"{s2['ratio']:.3f}",
            f">= {TARGETS['events_ratio']} {verdict(s2['ratio'] >= TARGETS['events_ratio'])}",
        ])  # fmt: skip
    s3 = out.get("3")
    if s3:
        rows.append([
            "3", f"PG row updates, {s3['granted_journaled']:,} granted req, {s3['users']:,} users,"
            " 2 flushes", f"{s3['row_updates']:,}",
            f"(+{s3['row_inserts']:,} audit inserts)", "",
            f"<= {TARGETS['row_updates']:,} {verdict(s3['row_updates'] <= TARGETS['row_updates'])}",
        ])  # fmt: skip
    s4 = out.get("4")
    if s4:
        rows.append([
            "4", f"expiry sweep, {s4['users']:,} connected / {s4['stale']:,} stale",
            f"{s4['sweep']['seconds']} s", f"{s4['sweep']['users_per_s']:,} users/s",
            "", "report",
        ])  # fmt: skip
        rows.append([
            "4", "  steady sweep (nothing to expire) / flush of 100k activity",
            f"{s4['sweep_nothing_to_expire_s']} s", f"{s4['flush']['seconds']} s", "", "",
        ])  # fmt: skip
    s5 = out.get("5")
    if s5:
        rm = s5["redis"]
        rows.append([
            "5", f"Redis memory per {rm['users']:,} cached users",
            f"{rm['memory_usage_mib']} MiB", f"used_memory delta {rm['used_memory_delta_mib']} MiB",
            "", "report",
        ])  # fmt: skip
        rows.append(
            ["5", "RSS one API worker", f"{s5['rss_api_worker_mib']} MiB", "", "", "report"]
        )
        rows.append([
            "5", "RSS one worker process", f"{s5['rss_worker_process_mib']} MiB", "", "", "report",
        ])  # fmt: skip
    return rows


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--name", default="sessiond_bench5", help="vhost and database")
    p.add_argument("--redis-db", type=int, default=12)
    p.add_argument("--workers", type=int, default=2, help="API workers (and bare Sanic workers)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--duration", type=int, default=10, help="wrk seconds")
    p.add_argument("--rounds", type=int, default=2, help="alternating wrk rounds per server")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--revocations", type=int, default=20)
    p.add_argument("--event-users", type=int, default=1000)
    p.add_argument("--events-per-user", type=int, default=10)
    p.add_argument("--events-timeout", type=float, default=240)
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--request-users", type=int, default=1000)
    p.add_argument("--cache-users", type=int, default=100_000)
    p.add_argument("--expiry-users", type=int, default=1_000_000)
    p.add_argument("--expiry-stale", type=int, default=100_000)
    p.add_argument("--expiry-pending", type=int, default=100_000)
    p.add_argument("--only", default="1,2,3,4,5", help="stages to run (3 needs 2)")
    p.add_argument("--quick", action="store_true", help="small sizes, to check the bench itself")
    p.add_argument("--profile", action="store_true", help="py-spy the API (1) and workers (2)")
    p.add_argument("--profile-s", type=float, default=20)
    p.add_argument("--json-out", type=Path, default=harness.RESULTS / "bench.json")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.revocations, args.rounds = 3, 5, 1
        args.event_users, args.events_per_user = 200, 5
        args.requests, args.request_users, args.cache_users = 10_000, 200, 10_000
        args.expiry_users, args.expiry_stale, args.expiry_pending = 20_000, 2_000, 2_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stages = {s.strip() for s in args.only.split(",") if s.strip()}
    harness.RESULTS.mkdir(exist_ok=True)
    bench = Bench(args)
    out: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average": {"start": harness.load_average()},
        "settings": {k: v for k, v in vars(args).items() if k != "json_out"},
    }
    started = time.monotonic()
    timings: dict[str, float] = {}

    def stage(key: str, fn: Callable[[], dict[str, Any]]) -> None:
        if key not in stages:
            return
        say(f"stage {key} ... (load average {harness.load_average()})")
        t = time.monotonic()
        out[key] = fn()
        timings[key] = round(time.monotonic() - t, 1)
        out["load_average"][f"after_{key}"] = harness.load_average()

    try:
        if stages & {"1", "2", "3", "5"}:
            bench.start()
        stage("1", bench.auth_check)
        stage("2", bench.events)
        stage("3", bench.activity_writes)
        if "5" in stages:
            assert bench.api is not None and bench.worker is not None
            api_rss = out.get("1", {}).get("rss_api_after_load") or rss_of(bench.api)
            worker_rss = out.get("2", {}).get("rss_worker_after_load") or rss_of(bench.worker)
            bench.stop()
            stage("5", lambda: {"redis": bench.redis_memory()})
            out["5"]["rss_api"] = api_rss
            out["5"]["rss_worker"] = worker_rss
            out["5"]["rss_api_worker_mib"] = max(api_rss["children"] or [0])
            out["5"]["rss_worker_process_mib"] = max(worker_rss["children"] or [0])
        bench.stop()
        stage("4", bench.expiry)
    finally:
        bench.stop()
        bench.loop.close()
    out["stage_s"] = timings
    out["total_s"] = round(time.monotonic() - started, 1)
    out["table"] = render(table(out))
    args.json_out.write_text(json.dumps(out, indent=2))
    say("")
    say(out["table"])
    say(f"\ntotal {out['total_s']} s; load average {out['load_average']}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
