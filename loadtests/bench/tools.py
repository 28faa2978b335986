"""What every stage uses: wrk, a timing HTTP client, the auth service's publisher, tokens, events,
py-spy, and process measurements."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import jwt
import pika

from loadtests import harness
from sessiond import amqp, stack
from sessiond.config import Settings

T = TypeVar("T")


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
