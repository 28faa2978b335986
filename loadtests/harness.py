"""What the load run and the benchmark share: a private namespace on the local stack (vhost,
database, Redis db), sessiond processes started the way an operator starts them, readiness
waits and process figures (RSS, CPU).

Nothing here runs under gevent: the locustfiles never import this module.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import asyncpg
import pika

from sessiond import amqp, stack
from sessiond.config import Settings
from sessiond.events import partition_queue
from storage import redis_conn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
TABLES = ("audit_events", "event_receipts", "processed_events", "sessions", "users")
# Redis dbs that other suites on a shared stack use (dev 0, tests 15, other isolations).
RESERVED_REDIS_DBS = frozenset({0, 11, 13, 14, 15})
BENCH_SECRET = "loadtest-secret-that-is-long-enough-for-hs256"


def settings_from(env: dict[str, str]) -> Settings:
    """A ``Settings`` built from ``SESSIOND_*`` variables only (not this process's environment)."""
    data = {
        k.removeprefix("SESSIOND_").lower(): v for k, v in env.items() if k.startswith("SESSIOND_")
    }
    return Settings.model_validate(data)


def private_env(name: str, redis_db: int, *, jwt_secret: str = BENCH_SECRET) -> dict[str, str]:
    """``SESSIOND_*`` variables reaching a namespace of our own on the local stack: vhost and
    database ``name`` (created when missing) and Redis db ``redis_db``."""
    if redis_db in RESERVED_REDIS_DBS:
        raise SystemExit(f"Redis db {redis_db} belongs to another suite; pick another one")
    env = stack.namespace_env(stack.StackConfig.from_env(), name, redis_db)
    env["SESSIOND_ENV"] = "test"
    env["SESSIOND_JWT_SECRET"] = jwt_secret
    env["SESSIOND_LOG_LEVEL"] = "WARNING"
    return env


def env_from_environment() -> dict[str, str]:
    """The ``SESSIOND_*`` variables of this process (``--use-env``: the caller owns them)."""
    return {k: v for k, v in os.environ.items() if k.startswith("SESSIOND_")}


def all_queues(settings: Settings) -> list[str]:
    names = [settings.ingest_queue, settings.dead_letter_queue]
    for q in [*(partition_queue(i) for i in range(settings.partitions)), "sessiond.jobs"]:
        names += [q, f"{q}.DQ", f"{q}.XQ"]
    return names


@contextlib.contextmanager
def amqp_channel(settings: Settings) -> Iterator[Any]:
    conn = pika.BlockingConnection(amqp.connection_parameters(settings))
    try:
        yield conn.channel()
    finally:
        if conn.is_open:
            conn.close()


def queue_depths(settings: Settings, queues: list[str]) -> dict[str, int]:
    """Ready + unacknowledged messages would need the management API; ready ones suffice here
    because the callers also wait for the database to show every event."""
    depths: dict[str, int] = {}
    conn = pika.BlockingConnection(amqp.connection_parameters(settings))
    try:
        for q in queues:
            ch = conn.channel()
            try:
                depths[q] = int(ch.queue_declare(q, passive=True).method.message_count)
                ch.close()
            except pika.exceptions.ChannelClosedByBroker:  # not declared yet: empty
                depths[q] = 0
    finally:
        if conn.is_open:
            conn.close()
    return depths


async def reset(settings: Settings) -> None:
    """Empty namespace: schema migrated, tables truncated, Redis db flushed, queues purged, and
    the topology the auth service publishes to declared (so no publish is unroutable)."""
    from storage import db as db_mod

    await db_mod.migrate(settings)
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()
    client = redis_conn.connect(settings)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    purge(settings)


def purge(settings: Settings) -> None:
    conn = pika.BlockingConnection(amqp.connection_parameters(settings))
    try:
        ch = conn.channel()
        amqp.declare_topology(ch, settings)
        for q in all_queues(settings):
            try:
                ch.queue_purge(q)
            except pika.exceptions.ChannelClosedByBroker:  # not declared yet
                ch = conn.channel()
    finally:
        if conn.is_open:
            conn.close()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(span: int = 1) -> int:
    """A port (the first of ``span`` consecutive ones) free on 127.0.0.1 for a server started a
    moment later, taken outside the kernel's ephemeral range. ``bind(0)`` would give a port in
    that range, where every outgoing connection of the suite also takes its local port: a
    worker's or a client's connection opened in between left the server "Address already in
    use" (seen once in CI: the model run's API)."""
    low, high = _ephemeral_range()
    # Above the range when there is room (the stacks' fixed ports are all below it), else below.
    first, last = (high + 1, 65535 - span) if 65535 - high > 1000 else (10000, low - span)
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(first, last)
        with contextlib.ExitStack() as held:
            try:
                for offset in range(span):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no {span} free consecutive port(s) in {first}-{last}")


@dataclass
class Proc:
    """A child process in its own process group, logging to a file; stopped with SIGTERM."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    _handle: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.log.open("wb")
        self.popen = subprocess.Popen(
            self.argv,
            env={**os.environ, **self.env},
            cwd=ROOT,
            stdout=self._handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.popen is None:
            return None
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        if self._handle is not None:
            self._handle.close()
        return self.popen.returncode

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def sessiond(name: str, args: list[str], env: dict[str, str], logdir: Path) -> Proc:
    return Proc(name, [sys.executable, "-m", "sessiond.cli", *args], env, logdir / f"{name}.log")


def wait_for(
    predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(interval)


def http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> int:
    req = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - http://127.0.0.1 only
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def wait_http(url: str, proc: Proc, *, timeout: float = 60.0, expect: int = 200) -> None:
    def ready() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        return http_status(url) == expect

    wait_for(ready, timeout=timeout, what=f"{proc.name} at {url}", interval=0.2)


# --------------------------------------------------------------------------- process figures


def process_stats() -> Iterator[tuple[int, list[str]]]:
    """Each live process's pid and its ``/proc/<pid>/stat`` fields after ``(comm)``: state,
    ppid, pgrp, session, ... (from /proc, no psutil)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        yield int(entry.name), stat.rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    return sorted(child for child, fields in process_stats() if int(fields[1]) == pid)


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (from /proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def load_average() -> str:
    return Path("/proc/loadavg").read_text().strip()
