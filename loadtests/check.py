"""After a load run: does the final PostgreSQL and Redis state match what the publishers sent?

The ledger (written by the locustfiles, ``--ledger-file``) lists every user the run touched with
the sessions that must be open after the last confirmed event. The check waits until the
pipeline has drained (every confirmed event recorded in ``processed_events``, queues empty), then
compares, for the run's users only (ids ``lt-<run id>-…``):

- ``users.status`` and the open ``sessions`` rows with the expected sessions (missing and extra
  users both count);
- ``user:<id>`` in Redis: present with the same sessions for a connected user, absent otherwise;
- ``processed_events`` rows with the confirmed events (duplicates must not add any);
- the dead-letter queue: empty (every event was valid);
- optionally (``journal=True``, when the run owns the database) ``audit_events`` access rows with
  the HTTP answers the Locust users received: every decision journaled once (plus at most one
  request per Locust user cut short by the end of the run).

Users whose last publish was not confirmed are reported, not compared.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from loadtests.harness import queue_depths
from sessiond.config import Settings
from sessiond.events import partition_queue
from storage import redis_conn
from storage.activity import REFUSED_KEY

SAMPLE = 10


@dataclass
class Report:
    users: int = 0
    connected: int = 0
    uncertain: int = 0
    confirmed_events: int = 0
    processed_events: int = 0
    drained_s: float = 0.0
    journal_expected: int | None = None
    journal_rows: int | None = None
    mismatches: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, detail: str) -> None:
        items = self.mismatches.setdefault(kind, [])
        items.append(detail)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "users": self.users,
            "connected": self.connected,
            "uncertain": self.uncertain,
            "confirmed_events": self.confirmed_events,
            "processed_events": self.processed_events,
            "drained_s": self.drained_s,
            "journal_expected": self.journal_expected,
            "journal_rows": self.journal_rows,
            "mismatch_counts": {k: len(v) for k, v in self.mismatches.items()},
            "mismatch_samples": {k: v[:SAMPLE] for k, v in self.mismatches.items()},
        }


def _like(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def _processed(pg: asyncpg.Connection, prefix: str) -> int:
    return int(
        await pg.fetchval(
            "SELECT count(*) FROM processed_events WHERE user_id LIKE $1", _like(prefix)
        )
    )


async def wait_drained(
    settings: Settings, pg: asyncpg.Connection, prefix: str, confirmed: int, limit_s: float
) -> float:
    """Seconds until every confirmed event is processed and the event queues are empty."""
    queues = [settings.ingest_queue, *(partition_queue(i) for i in range(settings.partitions))]
    started = time.monotonic()
    while True:
        done = await _processed(pg, prefix) >= confirmed
        if done and not any((await asyncio.to_thread(queue_depths, settings, queues)).values()):
            return round(time.monotonic() - started, 2)
        if time.monotonic() - started > limit_s:
            return -1.0
        await asyncio.sleep(0.25)


def compare(
    expected: dict[str, dict[str, Any]],
    rows: dict[str, str],
    open_sessions: dict[str, set[str]],
    cached: dict[str, dict[str, Any] | None],
    report: Report,
) -> None:
    """The pure part: expected sessions per user vs PostgreSQL rows and Redis entries."""
    for uid in sorted(set(rows) - set(expected)):
        report.add("extra_user", uid)
    for uid, exp in sorted(expected.items()):
        if exp.get("uncertain"):
            report.uncertain += 1
            continue
        sessions = set(exp["sessions"])
        want = "connected" if sessions else "disconnected"
        report.connected += want == "connected"
        status = rows.get(uid)
        if status is None:
            report.add("missing_user", uid)
            continue
        if status != want:
            report.add("status", f"{uid}: {status}, expected {want}")
        got = open_sessions.get(uid, set())
        if got != sessions:
            report.add("sessions", f"{uid}: {sorted(got)}, expected {sorted(sessions)}")
        entry = cached.get(uid)
        if want == "connected":
            if entry is None:
                report.add("redis_missing", uid)
            elif entry.get("status") != "connected" or set(entry.get("sessions", ())) != sessions:
                report.add("redis_stale", f"{uid}: {entry.get('status')} {entry.get('sessions')}")
        elif entry is not None:
            report.add("redis_extra", f"{uid}: {entry.get('status')} {entry.get('sessions')}")


async def check(
    settings: Settings,
    ledger: dict[str, Any],
    *,
    drain_timeout: float = 120.0,
    journal: bool,
    in_flight: int = 0,
) -> Report:
    """``in_flight``: Locust users stopped at the end may have had one request each reach the API
    (and be journaled) without seeing its answer; that many extra journal rows are tolerated."""
    prefix = str(ledger["prefix"])
    expected: dict[str, dict[str, Any]] = ledger["users"]
    report = Report(users=len(expected), confirmed_events=int(ledger["confirmed"]))
    pg = await asyncpg.connect(settings.database_url)
    client = redis_conn.connect(settings, decode_responses=True)
    try:
        report.drained_s = await wait_drained(
            settings, pg, prefix, report.confirmed_events, drain_timeout
        )
        if report.drained_s < 0:
            report.add("not_drained", f"pipeline not drained within {drain_timeout}s")
        like = _like(prefix)
        rows = {
            r["id"]: r["status"]
            for r in await pg.fetch("SELECT id, status FROM users WHERE id LIKE $1", like)
        }
        open_sessions: dict[str, set[str]] = {}
        for r in await pg.fetch(
            "SELECT user_id, session_id FROM sessions"
            " WHERE status = 'connected' AND user_id LIKE $1",
            like,
        ):
            open_sessions.setdefault(r["user_id"], set()).add(r["session_id"])
        ids = sorted(expected)
        cached: dict[str, dict[str, Any] | None] = {}
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            values = await client.mget([f"user:{uid}" for uid in chunk])
            for uid, raw in zip(chunk, values, strict=True):
                cached[uid] = json.loads(raw) if raw else None
        async for key in client.scan_iter(f"user:{prefix}*", count=1000):
            if key.removeprefix("user:") not in expected:
                report.add("redis_extra", key)
        compare(expected, rows, open_sessions, cached, report)

        report.processed_events = await _processed(pg, prefix)
        failed = int(ledger["failed"])
        if not (
            report.confirmed_events <= report.processed_events <= report.confirmed_events + failed
        ):
            report.add(
                "processed_events",
                f"{report.processed_events} rows for {report.confirmed_events} confirmed events"
                f" (+{failed} unconfirmed)",
            )
        dead = (await asyncio.to_thread(queue_depths, settings, [settings.dead_letter_queue]))[
            settings.dead_letter_queue
        ]
        if dead:
            report.add("dead_letters", f"{dead} events dead-lettered")
        if journal:
            report.journal_expected = int(ledger["http_answers"])
            # A row per granted/forbidden answer; refused tokens (401) are counted per minute:
            # their rows carry the count, and the minutes not yet journaled wait in Redis.
            journaled = await pg.fetchval(
                "SELECT coalesce(sum(coalesce((detail->>'count')::int, 1)), 0)"
                " FROM audit_events WHERE kind = 'access'"
            )
            waiting = sum(int(n) for n in (await client.hgetall(REFUSED_KEY)).values())
            report.journal_rows = int(journaled) + waiting
            extra = report.journal_rows - report.journal_expected
            if not 0 <= extra <= in_flight:
                report.add(
                    "access_journal",
                    f"{report.journal_rows} access rows for {report.journal_expected} answers",
                )
    finally:
        await client.aclose()
        await pg.close()
    return report
