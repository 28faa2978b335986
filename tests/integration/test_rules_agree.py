"""The real writers agree with the pure rules: the same histories applied on PostgreSQL (batches,
the sweep, the whole pipeline with two worker processes) and in memory (``tests.unit.memory``)
end in the same rows, and in the state the reference model names."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from sessiond.config import Settings
from sessiond.events import Event, EventKind
from storage import cache as cache_mod
from storage import expiry, state
from storage.activity import ActivityBuffer
from storage.rows import IMPLICIT
from tests.conftest import Amqp, Process, async_wait_until
from tests.integration.test_pipeline import worker  # noqa: F401  (the module's worker fixture)
from tests.unit.memory import Memory
from tests.unit.test_rules_model import reference

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
USER_COLUMNS = ("status", "connected_at", "disconnected_at", "seen_at", "logged_out_at", "version")
SESSION_COLUMNS = ("status", "started_at", "ended_at", "end_reason", "last_event_at")


def history(seed: int, *, users: int = 6, size: int = 120) -> tuple[list[Event], list[Event]]:
    """Distinct events (few instants, so ties happen), and an arrival order with duplicates."""
    rnd = random.Random(seed)
    seen: set[tuple[Any, ...]] = set()
    events: list[Event] = []
    while len(events) < size:
        kind: EventKind = rnd.choice(["connected", "connected", "disconnected"])
        user, sid = f"u{rnd.randrange(users)}", rnd.choice([None, "x", "y", "z"])
        t = rnd.randrange(40)
        if (kind, user, sid, t) in seen:
            continue
        seen.add((kind, user, sid, t))
        events.append(
            Event(
                kind=kind,
                user_id=user,
                session_id=sid,
                occurred_at=T0 + timedelta(seconds=t),
                event_id=f"{seed}-{len(events)}" if rnd.random() < 0.5 else None,
            )
        )
    arrival = events + rnd.choices(events, k=size // 4)
    rnd.shuffle(arrival)
    return events, arrival


async def rows_of(pg: asyncpg.Connection) -> dict[str, Any]:
    users = await pg.fetch(f"SELECT id, {', '.join(USER_COLUMNS)} FROM users ORDER BY id")
    sessions = await pg.fetch(
        f"SELECT user_id, session_id, {', '.join(SESSION_COLUMNS)} FROM sessions"
        " ORDER BY user_id, session_id"
    )
    audit = await pg.fetch(
        "SELECT user_id, session_id, kind, reason, occurred_at FROM audit_events ORDER BY id"
    )
    outbox = await pg.fetch(
        "SELECT type, user_id, session_id, reason, occurred_at FROM outbox ORDER BY id"
    )
    return {
        "users": {r["id"]: tuple(r[c] for c in USER_COLUMNS) for r in users},
        "sessions": {
            (r["user_id"], r["session_id"]): tuple(r[c] for c in SESSION_COLUMNS) for r in sessions
        },
        "audit": [tuple(r) for r in audit],
        "outbox": [tuple(r) for r in outbox],
    }


def rows_in(memory: Memory) -> dict[str, Any]:
    return {
        "users": {
            u: tuple(row[c] for c in USER_COLUMNS) for u, row in sorted(memory.users.items())
        },
        "sessions": {
            key: tuple(getattr(s, c) for c in SESSION_COLUMNS)
            for key, s in sorted(memory.sessions.items())
        },
        # (occurred_at, user_id, session_id, kind, reason, source, detail) as journaled
        "audit": [(a[1], a[2], a[3], a[4], a[0]) for a in memory.audit],
        "outbox": memory.outbox,
    }


def per_user(rows: list[tuple[Any, ...]], col: int = 1) -> dict[str, list[tuple[Any, ...]]]:
    """Rows grouped by user, in order: the order across users is not part of the contract."""
    grouped: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        grouped.setdefault(row[col], []).append(row)
    return grouped


def open_in(rows: dict[str, Any]) -> set[tuple[str, str]]:
    return {key for key, cols in rows["sessions"].items() if cols[0] == "connected"}


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_batches_on_postgres_end_as_in_memory(
    db: Settings, pg: asyncpg.Connection, seed: int
) -> None:
    # Given a history with duplicates in a random order, cut into batches of random sizes
    events, arrival = history(seed)
    rnd = random.Random(seed)
    memory = Memory()

    # When each batch is applied on PostgreSQL and in memory
    start = 0
    while start < len(arrival):
        batch = arrival[start : start + rnd.randint(1, 25)]
        start += len(batch)
        await state.apply_events(batch, limits=state.Limits())
        memory.apply_events(batch)

    # Then both hold the same rows, journal and outbox, and the model's open sessions
    on_disk, in_memory = await rows_of(pg), rows_in(memory)
    for name in ("users", "sessions", "audit", "outbox"):
        assert on_disk[name] == in_memory[name], name
    assert open_in(on_disk) == reference(events)
    assert 0 < len(reference(events)) < len(on_disk["sessions"])


async def test_the_sweep_ends_what_the_rules_end(
    db: Settings, pg: asyncpg.Connection, cache: cache_mod.Cache
) -> None:
    # Given users connected at many times, some with several sessions
    events, arrival = history(9, users=40, size=400)
    memory = Memory()
    for start in range(0, len(arrival), 50):
        await state.apply_events(arrival[start : start + 50], limits=state.Limits())
        memory.apply_events(arrival[start : start + 50])
    now = T0 + timedelta(seconds=45)

    # When the sweep runs (idle timeout 20 s, lifetime 30 s, small batches) on PostgreSQL, and
    # the rules run over every user in memory
    result = await expiry.sweep(
        cache, ActivityBuffer(cache.client), now=now, idle_timeout_s=20, batch_size=7,
        session_max_s=30,
    )  # fmt: skip
    memory.sweep(now=now, idle_timeout_s=20, session_max_s=30)

    # Then both hold the same users and sessions, and journaled the same expiries
    on_disk, in_memory = await rows_of(pg), rows_in(memory)
    assert on_disk["users"] == in_memory["users"]
    assert on_disk["sessions"] == in_memory["sessions"]
    expired = [a for a in on_disk["audit"] if a[2] == "expired"]
    assert per_user(expired, 0) == per_user([a for a in in_memory["audit"] if a[2] == "expired"], 0)
    assert per_user(on_disk["outbox"]) == per_user(in_memory["outbox"])
    assert result.expired > 0 and result.lifetime_sessions_ended > 0
    assert 0 < len(open_in(on_disk)) < len(reference(events))


async def _processed(pg: asyncpg.Connection, n: int) -> bool:
    return int(await pg.fetchval("SELECT count(*) FROM processed_events")) >= n


@pytest.mark.parametrize("seed", [4, 5])
async def test_the_pipeline_ends_as_the_model(
    worker: Process,  # noqa: F811
    broker_client: Amqp,
    pg: asyncpg.Connection,
    seed: int,
) -> None:
    # Given a history with duplicates, published in a random order to the real broker
    events, arrival = history(seed, users=10, size=200)
    bodies = []
    for ev in arrival:
        body: dict[str, Any] = {
            "event": ev.kind,
            "user_id": ev.user_id,
            "occurred_at": ev.occurred_at.isoformat(),
        }
        if ev.session_id is not None:
            body["session_id"] = ev.session_id
        if ev.event_id is not None:
            body["event_id"] = ev.event_id
        bodies.append(body)

    # When two worker processes apply it
    broker_client.publish_many(bodies)
    await async_wait_until(lambda: _processed(pg, len(events)), timeout=120, interval=0.25)

    # Then the open sessions and connected users are the model's, and the rules in memory,
    # fed the same arrival, agree
    on_disk = await rows_of(pg)
    memory = Memory()
    memory.apply_events(arrival)
    expected = reference(events)
    assert open_in(on_disk) == expected == memory.open_sessions()
    connected = {u for u, cols in on_disk["users"].items() if cols[0] == "connected"}
    assert connected == {u for u, _ in expected} == memory.connected_users()
    assert all(sid in ("x", "y", "z", IMPLICIT) for _, sid in expected)
