"""A tiny Prometheus registry (counters and histograms, text exposition format 0.0.4).

``prometheus_client`` is not a dependency; this covers what ``/metrics`` needs with a dict update
per observation. Each Sanic worker process keeps its own registry; with several workers,
``SharedMetrics`` makes every scrape report the sum over all of them, whichever worker answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from bisect import bisect_left
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from api.background import cancel, every

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


class Counter:
    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, by: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + by

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def add(self, labels: tuple[str, ...], value: float) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for labels, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.labelnames, labels)} {_num(value)}")
        return lines


class Histogram:
    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(sorted(buckets))
        # Per label set: one count per bucket (non-cumulative, +Inf last), then sum.
        self.values: dict[tuple[str, ...], list[float]] = {}

    def observe(self, value: float, *labels: str) -> None:
        row = self.values.get(labels)
        if row is None:
            row = self.values[labels] = [0.0] * (len(self.buckets) + 2)
        row[bisect_left(self.buckets, value)] += 1
        row[-1] += value

    def add(self, labels: tuple[str, ...], row: Sequence[float]) -> None:
        mine = self.values.get(labels)
        if mine is None:
            mine = self.values[labels] = [0.0] * (len(self.buckets) + 2)
        for i, value in enumerate(row):
            mine[i] += value

    def count(self, *labels: str) -> int:
        row = self.values.get(labels)
        return int(sum(row[:-1])) if row else 0

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for labels, row in sorted(self.values.items()):
            cumulative = 0.0
            for bound, n in zip((*self.buckets, float("inf")), row[:-1], strict=True):
                cumulative += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                bucket = _labels(self.labelnames, labels, f'le="{le}"')
                lines.append(f"{self.name}_bucket{bucket} {_num(cumulative)}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, labels)} {row[-1]!r}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, labels)} {_num(cumulative)}")
        return lines


class Metrics:
    """The API's metrics, one instance per worker process (kept on ``app.ctx``)."""

    def __init__(self) -> None:
        self.decisions = Counter(
            "sessiond_access_decisions_total",
            "Access decisions by route, decision (granted, forbidden, invalid_token) and reason.",
            ("route", "decision", "reason"),
        )
        self.latency = Histogram(
            "sessiond_request_duration_seconds",
            "Time to decide a protected request, by route.",
            ("route",),
        )
        self.cache = Counter(
            "sessiond_user_cache_total",
            "Redis user cache lookups by result: hit, miss, gone (a miss refused by the user's"
            " gone mark), bypass (Redis down).",
            ("result",),
        )
        self.errors = Counter(
            "sessiond_http_errors_total",
            "Responses with a status of 500 or more, by status.",
            ("status",),
        )
        self.reconciled = Counter(
            "sessiond_cache_reconciled_total",
            "Cached users evicted by the reconciler because their entry was older than the row.",
        )
        self.backchannel = Counter(
            "sessiond_backchannel_logout_total",
            "OIDC back-channel logout requests by result: ok, or why the token was refused.",
            ("result",),
        )

        self.overflow = Counter(
            "sessiond_access_log_overflow_total",
            "Access decisions counted instead of stored because a buffer was at its cap: api (this"
            " process, while Redis is down) or redis (the audit:access list, while PostgreSQL is"
            " down). Each count is journaled as an access_log_overflow audit entry.",
            ("buffer",),
        )

    def families(self) -> tuple[Counter | Histogram, ...]:
        return (
            self.decisions, self.latency, self.cache, self.errors, self.reconciled,
            self.backchannel, self.overflow,
        )  # fmt: skip

    def snapshot(self) -> dict[str, list[list[Any]]]:
        """Every family's values as JSON-able ``[labels, value or bucket row]`` pairs."""
        return {f.name: [[list(k), v] for k, v in f.values.items()] for f in self.families()}

    def absorb(self, snapshot: dict[str, list[list[Any]]]) -> None:
        for family in self.families():
            for labels, value in snapshot.get(family.name, []):
                family.add(tuple(labels), value)  # type: ignore[arg-type]

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.families():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


class SharedMetrics:
    """The sum over the Sanic workers of one API process, by way of a directory: each worker
    writes its snapshot there every ``period_s`` (atomically) and before answering a scrape,
    then adds up every file. A worker that died keeps its file, so totals never go backwards
    while the process lives; the main process creates the directory anew at each start."""

    def __init__(self, metrics: Metrics, directory: Path, *, period_s: float = 1.0) -> None:
        self.metrics = metrics
        self.directory = directory
        self.period_s = period_s
        self.path = directory / f"{os.getpid()}.json"
        self._task: asyncio.Task[None] | None = None

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.metrics.snapshot()))
        os.replace(tmp, self.path)

    def render(self) -> str:
        self.write()
        total = Metrics()
        for path in sorted(self.directory.glob("*.json")):
            try:
                total.absorb(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:  # a file being replaced: its worker's next write
                log.debug("metrics file skipped", extra={"path": str(path), "error": repr(exc)})
        return total.render()

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.write()
        self._task = every(self.period_s, self._write, name="metrics")

    async def _write(self) -> None:
        self.write()

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None
        with contextlib.suppress(OSError):
            self.write()
