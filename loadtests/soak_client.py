"""The soak's load generator: keep-alive HTTP/1.1 connections sending ``GET /auth/check`` with a
mix of tokens, in a process of its own so that the soak's sampling never slows it (nor it the
sampling). Each second it reports requests, statuses and latency percentiles on a queue.

Open loop at a target rate: each connection sends on a fixed schedule (``connections / rate``
apart) and, when an answer is late, the next request goes at once; a closed loop (``rate`` 0)
measures the maximum rate this client gets from the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import Queue
from typing import Any


@dataclass
class Second:
    """What happened in one wall-clock second."""

    at: int
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2) if lat else None

        return {
            "t": self.at,
            "requests": len(lat),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
        }


class Load:
    def __init__(self, port: int, tokens: Sequence[str], *, connections: int, rate: float) -> None:
        self.port = port
        self.tokens = tokens
        self.connections = connections
        self.rate = rate
        self.seconds: dict[int, Second] = {}
        self.totals: dict[int, int] = {}
        self.errors = 0

    def _second(self, now: float) -> Second:
        at = int(now)
        sec = self.seconds.get(at)
        if sec is None:
            sec = self.seconds[at] = Second(at)
        return sec

    async def _connection(self, index: int, until: float) -> None:
        interval = self.connections / self.rate if self.rate > 0 else 0.0
        next_at = time.monotonic() + (index * interval / self.connections if interval else 0.0)
        i = index
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while time.monotonic() < until:
            if interval:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at = max(next_at + interval, time.monotonic() - interval)
            token = self.tokens[i % len(self.tokens)]
            i += self.connections
            request = (
                f"GET /auth/check HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {token}\r\n\r\n"
            ).encode()
            started = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                assert reader is not None
                writer.write(request)
                status = await asyncio.wait_for(self._response(reader), timeout=10)
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
                self.errors += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.05)
                continue
            elapsed = time.perf_counter() - started
            sec = self._second(time.time())
            sec.latencies.append(elapsed)
            sec.statuses[status] = sec.statuses.get(status, 0) + 1
            self.totals[status] = self.totals.get(status, 0) + 1
        if writer is not None:
            writer.close()

    @staticmethod
    async def _response(reader: asyncio.StreamReader) -> int:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if length:
            await reader.readexactly(length)
        return status

    async def run(self, seconds: float, out: Queue[Any] | None) -> dict[str, Any]:
        until = time.monotonic() + seconds
        tasks = [asyncio.create_task(self._connection(i, until)) for i in range(self.connections)]
        reporter = asyncio.create_task(self._report(out)) if out is not None else None
        await asyncio.gather(*tasks)
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        self._flush_seconds(out, upto=int(time.time()) + 1)
        total = sum(self.totals.values())
        return {"totals": self.totals, "errors": self.errors, "rate": total / seconds}

    def _flush_seconds(self, out: Queue[Any] | None, *, upto: int) -> None:
        for at in sorted(self.seconds):
            if at < upto:
                sec = self.seconds.pop(at)
                if out is not None:
                    out.put(sec.report())

    async def _report(self, out: Queue[Any] | None) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._flush_seconds(out, upto=int(time.time()))


def run_load(
    port: int,
    tokens: Sequence[str],
    connections: int,
    rate: float,
    seconds: float,
    out: Queue[Any] | None,
    done: Queue[Any],
) -> None:
    """Entry point of the load process: per-second reports on ``out``, totals on ``done``."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # the default loop is only slower
        pass
    load = Load(port, tokens, connections=connections, rate=rate)
    done.put(asyncio.run(load.run(seconds, out)))
