"""What every fault test shares: a known stream of events, the state it must end in, and the
measurement of what a fault cost (sent, applied, lost, duplicated in effect, recovery time).

Each event has an ``event_id``, so "applied" is exact: the ``processed_events`` row of its
de-duplication key exists. "Duplicated in effect" counts state transitions journaled more than
once for the same session (two ``connected`` audit rows for one session, say), which is what a
redelivered event applied twice would leave behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pika

from sessiond import amqp
from sessiond.config import Settings
from sessiond.events import dedup_key_for
from storage import redis_conn

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "faults"
T0 = datetime(2026, 1, 1, tzinfo=UTC)

# Workers in fault tests get a retry budget longer than any outage the tests cause (40 retries
# of at most 2 s): an event must wait for the database, not be dead-lettered while it is away.
# Production's default budget (12 retries, 0.5 s … 60 s backoff) covers about 8 minutes.
WORKER_ENV: dict[str, str] = {
    "SESSIOND_RETRY_MAX": "40",
    "SESSIOND_RETRY_MIN_BACKOFF_MS": "200",
    "SESSIOND_RETRY_MAX_BACKOFF_MS": "2000",
    "SESSIOND_LOG_LEVEL": "INFO",
}
WORKER_ARGS = ("worker", "--processes", "2", "--threads", "4")


def pg_down_s() -> float:
    """How long PostgreSQL stays stopped: 30 s as the issue asks; CI may shorten it."""
    return float(os.environ.get("SESSIOND_FAULT_PG_DOWN_S", "30"))


@dataclass
class Stream:
    """Per user: sessions ``a`` and ``b`` connect, ``a`` ends; every other user also ends ``b``.

    Times increase per user, so whatever the delivery order the final state is fixed: users with
    ``b`` ended are disconnected, the others connected with exactly session ``b``."""

    prefix: str
    users: int
    events: list[dict[str, Any]] = field(default_factory=list)
    expected: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for u in range(self.users):
            uid = f"{self.prefix}-{u}"
            base = T0 + timedelta(seconds=u)
            steps = [("connected", "a"), ("connected", "b"), ("disconnected", "a")]
            if u % 2 == 0:
                steps.append(("disconnected", "b"))
            for i, (kind, sid) in enumerate(steps):
                self.events.append(
                    {
                        "event": kind,
                        "user_id": uid,
                        "session_id": sid,
                        "event_id": f"{uid}-{i}",
                        "occurred_at": (base + timedelta(milliseconds=100 * i)).isoformat(),
                        "name": f"User {u}",
                        "email": f"{uid}@example.com",
                    }
                )
            self.expected[uid] = "disconnected" if u % 2 == 0 else "connected"
        # Interleave users so that every partition is busy at once, as in production.
        self.events.sort(key=lambda e: (e["event_id"].rsplit("-", 1)[1], e["user_id"]))

    def split(self, fraction: float = 0.5) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        cut = int(len(self.events) * fraction)
        return self.events[:cut], self.events[cut:]


def publish(settings: Settings, events: list[dict[str, Any]], *, batch: int = 200) -> None:
    """Publishes like the auth service (persistent JSON to the topic exchange), in AMQP
    transactions: a committed batch is stored by the broker."""
    conn = pika.BlockingConnection(amqp.connection_parameters(settings))
    try:
        ch = conn.channel()
        amqp.declare_topology(ch, settings)
        ch.tx_select()
        for i, body in enumerate(events, 1):
            ch.basic_publish(
                settings.events_exchange,
                "auth.fault",
                json.dumps(body).encode(),
                pika.BasicProperties(delivery_mode=2, content_type="application/json"),
            )
            if i % batch == 0:
                ch.tx_commit()
        ch.tx_commit()
    finally:
        if conn.is_open:
            conn.close()


def publish_in_background(settings: Settings, events: list[dict[str, Any]]) -> threading.Thread:
    thread = threading.Thread(target=publish, args=(settings, events), daemon=True)
    thread.start()
    return thread


async def fetchval(settings: Settings, sql: str, *args: Any) -> Any:
    """A fresh connection per query: the fault may have killed any connection held before."""
    conn = await asyncpg.connect(settings.database_url, timeout=5)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def fetch(settings: Settings, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.database_url, timeout=5)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def applied(settings: Settings, stream: Stream) -> int:
    """Events of the stream whose de-duplication key is recorded (committed exactly once)."""
    try:
        return int(
            await fetchval(
                settings,
                "SELECT count(*) FROM processed_events WHERE key = ANY($1::text[])",
                [dedup_key_for("auth", str(e["user_id"]), e["event_id"]) for e in stream.events],
            )
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return -1  # PostgreSQL down right now


async def wait_applied(
    settings: Settings, stream: Stream, *, at_least: int | None = None, timeout: float = 60.0
) -> float:
    """Waits until ``at_least`` (default: all) events are applied; returns the seconds waited."""
    goal = len(stream.events) if at_least is None else at_least
    started = time.monotonic()
    while (done := await applied(settings, stream)) < goal:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{done}/{goal} events applied after {timeout:.0f}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def duplicated_in_effect(settings: Settings, stream: Stream) -> int:
    """Session transitions journaled more than once (an event applied twice leaves this)."""
    return int(
        await fetchval(
            settings,
            "SELECT coalesce(sum(n - 1), 0) FROM ("
            " SELECT count(*) AS n FROM audit_events"
            " WHERE kind IN ('connected', 'disconnected') AND user_id LIKE $1"
            " GROUP BY user_id, session_id, kind) t",
            f"{stream.prefix}-%",
        )
    )


async def state_errors(settings: Settings, stream: Stream) -> list[str]:
    """Where PostgreSQL disagrees with what the events say (users and their open sessions)."""
    rows = await fetch(
        settings,
        "SELECT u.id, u.status, array_remove(array_agg(s.session_id ORDER BY s.session_id)"
        " FILTER (WHERE s.status = 'connected'), NULL) AS open"
        " FROM users u LEFT JOIN sessions s ON s.user_id = u.id"
        " WHERE u.id LIKE $1 GROUP BY u.id, u.status",
        f"{stream.prefix}-%",
    )
    actual = {r["id"]: (r["status"], list(r["open"] or [])) for r in rows}
    errors = []
    for uid, status in stream.expected.items():
        want = (status, ["b"] if status == "connected" else [])
        if actual.get(uid) != want:
            errors.append(f"{uid}: expected {want}, found {actual.get(uid)}")
    return errors


async def cache_errors(settings: Settings, stream: Stream, *, strict: bool = True) -> list[str]:
    """Where Redis disagrees with the events. ``strict``: every connected user is cached.
    Otherwise (after Redis lost its data) a missing key is fine: the API refills it from
    PostgreSQL; a key that is present must still be right, and no ended user may be cached."""
    client = redis_conn.connect(settings, decode_responses=True)
    try:
        errors = []
        for uid, status in stream.expected.items():
            raw = await client.get(f"user:{uid}")
            if raw is None:
                if status == "connected" and strict:
                    errors.append(f"{uid}: connected but not cached")
                continue
            cached = json.loads(raw)
            if status != "connected":
                errors.append(f"{uid}: disconnected but cached as {cached.get('status')}")
            elif cached.get("status") != "connected" or cached.get("sessions") != ["b"]:
                errors.append(f"{uid}: cached {cached.get('status')} {cached.get('sessions')}")
        return errors
    finally:
        await client.aclose()


@dataclass
class Figure:
    """One row of the fault table (``scripts/faults`` prints them)."""

    fault: str
    sent: int | None  # None: not an event stream (the API rows)
    applied: int | None
    lost: int
    duplicated: int
    recovery_s: float
    note: str = ""

    def save(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "_" for c in self.fault.lower())
        (RESULTS / f"{slug}.json").write_text(json.dumps(asdict(self)) + "\n")


async def measure(
    settings: Settings,
    stream: Stream,
    *,
    fault: str,
    recovered_at: float,
    strict_cache: bool = True,
    note: str = "",
    timeout: float = 60.0,
) -> Figure:
    """After the fault is over (``recovered_at``, monotonic): waits for every event, then checks
    the state and records the figure. Asserts nothing was lost or applied twice in effect."""
    with contextlib.suppress(AssertionError):  # measured and reported below as lost
        await wait_applied(settings, stream, timeout=timeout)
    recovery = time.monotonic() - recovered_at
    done = await applied(settings, stream)
    figure = Figure(
        fault=fault,
        sent=len(stream.events),
        applied=done,
        lost=len(stream.events) - done,
        duplicated=await duplicated_in_effect(settings, stream),
        recovery_s=round(recovery, 1),
        note=note,
    )
    figure.save()
    assert figure.lost == 0, figure
    assert figure.duplicated == 0, figure
    assert await state_errors(settings, stream) == []
    await wait_cache(settings, stream, strict=strict_cache)
    return figure


async def wait_cache(settings: Settings, stream: Stream, *, strict: bool) -> None:
    """The Redis projection catches up right after the commits; give it a moment, then insist."""
    deadline = time.monotonic() + 10
    while errors := await cache_errors(settings, stream, strict=strict):
        if time.monotonic() > deadline:
            raise AssertionError(errors[:10])
        await asyncio.sleep(0.2)


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout}s")
        time.sleep(0.1)


def next_delivery(consumer: Any) -> Any:
    for _ in range(20):  # the iterator yields None on its 100 ms inactivity timeout
        message = next(consumer)
        if message is not None:
            return message
    raise AssertionError("no delivery within 2 s")


def pump(consumer: Any) -> None:
    """Lets the consumer's connection run its queued callbacks (the acks), as its thread does."""
    consumer.connection.process_data_events(time_limit=0.3)
