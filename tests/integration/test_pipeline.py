"""The event pipeline end to end on real servers: plain AMQP publisher → ingress → partition actors
→ PostgreSQL + Redis, with two worker processes started by the ``sessiond worker`` command."""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from actors import deadletter
from sessiond import stack
from sessiond.config import Settings
from tests.conftest import Amqp, Process, async_wait_until, cache_entry_when, wait_until

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def worker(
    migrated: Settings, test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Process]:
    """Two worker processes, as ``sessiond worker`` runs them in production."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    argv = [sys.executable, "-m", "sessiond.cli", "worker", "--processes", "2", "--threads", "4"]
    proc = Process(argv, {**test_env, "SESSIOND_LOG_LEVEL": "INFO"}, log)
    yield proc
    assert proc.alive(), f"worker died:\n{proc.output()[-3000:]}"
    assert proc.stop() == 0, proc.output()[-3000:]


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


async def user_row(pg: asyncpg.Connection, user_id: str) -> dict[str, Any] | None:
    row = await pg.fetchrow("SELECT * FROM users WHERE id = $1", user_id)
    return dict(row) if row else None


async def status_of(pg: asyncpg.Connection, user_id: str) -> str | None:
    row = await user_row(pg, user_id)
    return row["status"] if row else None


async def processed(pg: asyncpg.Connection) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM processed_events"))


async def test_seed_messages_connect_then_disconnect(
    worker: Process, broker_client: Amqp, pg: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    # Given the seed's exact connected message, published by a plain AMQP client
    broker_client.publish(
        {"event": "connected", "user_id": "12345", "name": "John Doe", "email": "john@example.com"}
    )
    # Then the user is connected in PostgreSQL and cached in Redis with a TTL of at most 1 h
    await async_wait_until(lambda: _eq(status_of(pg, "12345"), "connected"))
    row = await user_row(pg, "12345")
    assert row is not None
    assert (row["name"], row["email"]) == ("John Doe", "john@example.com")
    assert row["connected_at"] is not None
    cached = await cache_entry_when(redis, "12345", lambda e: e is not None)
    assert cached is not None
    assert cached["status"] == "connected" and cached["email"] == "john@example.com"
    assert 0 < await redis.ttl("user:12345") <= 3600

    # When the seed's disconnected message follows
    broker_client.publish({"event": "disconnected", "user_id": "12345"})

    # Then the user is disconnected, the key is gone and both changes are journaled
    await async_wait_until(lambda: _eq(status_of(pg, "12345"), "disconnected"))
    row = await user_row(pg, "12345")
    assert row is not None and row["disconnected_at"] is not None
    assert await cache_entry_when(redis, "12345", lambda e: e is None) is None
    kinds = [
        r["kind"]
        for r in await pg.fetch("SELECT kind FROM audit_events WHERE user_id = '12345' ORDER BY id")
    ]
    assert kinds == ["connected", "disconnected"]


async def _eq(coro: Any, expected: Any) -> bool:
    return bool(await coro == expected)


async def test_stale_connected_after_newer_disconnected_is_ignored(
    worker: Process, broker_client: Amqp, pg: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    # Given a disconnected at t=20, applied first
    broker_client.publish({"event": "disconnected", "user_id": "u-stale", "occurred_at": at(20)})
    await async_wait_until(lambda: _count_ge(pg, 1))
    # When a connected at t=10 is delivered after it
    broker_client.publish({"event": "connected", "user_id": "u-stale", "occurred_at": at(10)})
    # Then both are processed but the user stays disconnected and uncached
    await async_wait_until(lambda: _count_ge(pg, 2))
    assert await status_of(pg, "u-stale") == "disconnected"
    assert await redis.exists("user:u-stale") == 0
    reasons = await pg.fetch(
        "SELECT reason FROM audit_events WHERE user_id = 'u-stale' AND kind = 'ignored'"
    )
    assert [r["reason"] for r in reasons] == ["stale"]


async def _count_ge(pg: asyncpg.Connection, n: int) -> bool:
    return await processed(pg) >= n


async def test_duplicate_changes_nothing(
    worker: Process, broker_client: Amqp, pg: asyncpg.Connection
) -> None:
    event = {"event": "connected", "user_id": "u-dup", "event_id": "e-1", "occurred_at": at(1)}
    broker_client.publish(event)
    await async_wait_until(lambda: _eq(status_of(pg, "u-dup"), "connected"))
    before = await user_row(pg, "u-dup")
    # When the very same event is delivered again
    broker_client.publish(event)
    await async_wait_until(
        lambda: pg.fetchval(
            "SELECT count(*) FROM audit_events WHERE user_id='u-dup' AND reason='duplicate'"
        )
    )
    # Then the row is exactly as before (same version, same times)
    after = await user_row(pg, "u-dup")
    assert before is not None and after is not None
    assert after["version"] == before["version"]
    assert after["updated_at"] == before["updated_at"]


async def test_two_sessions_ending_one_keeps_user_connected(
    worker: Process, broker_client: Amqp, pg: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    for i, sid in enumerate(("phone", "laptop")):
        broker_client.publish(
            {"event": "connected", "user_id": "u-2s", "session_id": sid, "occurred_at": at(i)}
        )
    broker_client.publish(
        {"event": "disconnected", "user_id": "u-2s", "session_id": "phone", "occurred_at": at(5)}
    )
    await async_wait_until(lambda: _count_ge(pg, 3))
    # The user is still connected through the laptop session, and the cache says so
    assert await status_of(pg, "u-2s") == "connected"
    sessions = {
        r["session_id"]: r["status"]
        for r in await pg.fetch("SELECT session_id, status FROM sessions WHERE user_id='u-2s'")
    }
    assert sessions == {"phone": "ended", "laptop": "connected"}
    cached = await cache_entry_when(
        redis, "u-2s", lambda e: e is not None and e["sessions"] == ["laptop"]
    )
    assert cached is not None and cached["status"] == "connected"
    # When the last session ends, the user is disconnected and evicted
    broker_client.publish(
        {"event": "disconnected", "user_id": "u-2s", "session_id": "laptop", "occurred_at": at(6)}
    )
    await async_wait_until(lambda: _eq(status_of(pg, "u-2s"), "disconnected"))
    assert await cache_entry_when(redis, "u-2s", lambda e: e is None) is None


INVALID: dict[str, bytes] = {
    "not_json": b"{not json",
    "not_object": b"[1, 2]",
    "unknown_event": b'{"event": "teleported", "user_id": "1"}',
    "missing_user_id": b'{"event": "connected"}',
    "invalid_user_id": json.dumps({"event": "connected", "user_id": "x" * 129}).encode(),
    "invalid_occurred_at": b'{"event": "connected", "user_id": "1", "occurred_at": "yesterday"}',
    "too_large": json.dumps({"event": "connected", "user_id": "1", "pad": "x" * 70_000}).encode(),
}


async def test_invalid_messages_are_dead_lettered_with_reason(
    worker: Process, broker_client: Amqp, pg: asyncpg.Connection, settings: Settings
) -> None:
    # Given one message of each invalid kind, then a valid one
    for body in INVALID.values():
        broker_client.publish(body)
    broker_client.publish({"event": "connected", "user_id": "u-after-bad"})
    # Then the valid one is applied (the worker keeps going)
    await async_wait_until(lambda: _eq(status_of(pg, "u-after-bad"), "connected"))
    # And every invalid one waits in the dead-letter queue, body intact, with its reason
    wait_until(lambda: broker_client.depth(settings.dead_letter_queue) >= len(INVALID))
    letters = list(deadletter.listing(settings, limit=50))
    assert sorted(letter.reason for letter in letters) == sorted(INVALID)
    by_reason = {letter.reason: letter.body for letter in letters}
    assert by_reason == INVALID
    # And each one is journaled
    await async_wait_until(
        lambda: _eq(
            pg.fetchval("SELECT count(*) FROM audit_events WHERE kind = 'dead_lettered'"),
            len(INVALID),
        )
    )


async def test_dead_letters_replay(
    worker: Process, broker_client: Amqp, pg: asyncpg.Connection, settings: Settings
) -> None:
    # Given a dead letter whose cause was fixed (here: a valid event placed there by hand)
    body = json.dumps({"event": "connected", "user_id": "u-replay", "occurred_at": at(1)}).encode()
    props = deadletter.properties(
        reason="retries_exhausted",
        detail="database down",
        source_queue="sessiond.events.p0",
        exchange=settings.events_exchange,
        routing_key="replay",
    )
    deadletter.bury(broker_client.ch, settings, body, props, journal=None)
    # When it is replayed
    assert deadletter.replay(settings) == 1
    # Then it is applied and the dead-letter queue is empty
    await async_wait_until(lambda: _eq(status_of(pg, "u-replay"), "connected"))
    assert broker_client.depth(settings.dead_letter_queue) == 0


@pytest.mark.slow
async def test_database_stopped_mid_stream_loses_nothing(
    worker: Process,
    broker_client: Amqp,
    pg: asyncpg.Connection,
    migrated: Settings,
    stack_config: stack.StackConfig,
) -> None:
    users = [f"db-{i}" for i in range(100)]
    for i, uid in enumerate(users[:50]):
        broker_client.publish({"event": "connected", "user_id": uid, "occurred_at": at(i)})
    await async_wait_until(lambda: _count_ge(pg, 50))
    await pg.close()
    # When PostgreSQL goes down while events keep coming
    stack.stop(stack_config, "postgres")
    try:
        for i, uid in enumerate(users[50:]):
            broker_client.publish({"event": "connected", "user_id": uid, "occurred_at": at(i)})
        for i, uid in enumerate(users[:50]):
            broker_client.publish(
                {"event": "disconnected", "user_id": uid, "occurred_at": at(100 + i)}
            )
        time.sleep(3)
    finally:
        stack.start(stack_config, "postgres")
    # Then every event is applied once it is back, none lost
    conn = await asyncpg.connect(migrated.database_url)
    try:
        await async_wait_until(lambda: _count_ge(conn, 150), timeout=90)
        rows = await conn.fetch("SELECT id, status FROM users")
        state = {r["id"]: r["status"] for r in rows}
        assert state == {
            **{u: "disconnected" for u in users[:50]},
            **{u: "connected" for u in users[50:]},
        }
    finally:
        await conn.close()
    assert broker_client.depth(migrated.dead_letter_queue) == 0


def scenario(users: int, events: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, bool]]:
    """Random per-user histories, strictly increasing in time, and the state they must end in."""
    rnd = random.Random(seed)
    per_user = events // users
    out: list[dict[str, Any]] = []
    expected: dict[str, bool] = {}
    for u in range(users):
        uid = f"load-{u}"
        sessions: dict[str, bool] = {}
        for i in range(per_user):
            sid = rnd.choice([None, "a", "b", "c"])
            kind = "connected" if rnd.random() < 0.6 else "disconnected"
            ev: dict[str, Any] = {
                "event": kind,
                "user_id": uid,
                "occurred_at": at(i + rnd.random() * 0.5),
                "event_id": f"{uid}-{i}",
            }
            if sid is not None:
                ev["session_id"] = sid
            key = sid or ""
            if kind == "connected":
                sessions[key] = True
            elif sid is None:
                sessions = dict.fromkeys(sessions, False)
            else:
                sessions[key] = False
            out.append(ev)
        expected[uid] = any(sessions.values())
    rnd.shuffle(out)
    return out, expected


def test_scenario_model_is_not_trivial() -> None:
    events, expected = scenario(50, 500, seed=1)
    assert len(events) == 500
    assert 0 < sum(expected.values()) < 50


@pytest.mark.slow
async def test_ten_thousand_events_for_a_thousand_users(
    worker: Process,
    broker_client: Amqp,
    pg: asyncpg.Connection,
    redis: aioredis.Redis,
    tmp_path: Path,
) -> None:
    events, expected = scenario(1000, 10_000, seed=42)
    started = time.monotonic()
    broker_client.publish_many(events)
    published = time.monotonic()
    await async_wait_until(lambda: _count_ge(pg, len(events)), timeout=240, interval=0.25)
    done = time.monotonic()
    rows = await pg.fetch("SELECT id, status FROM users")
    state = {r["id"]: r["status"] == "connected" for r in rows}
    assert state == expected
    # The worker syncs Redis just after each commit, so the last few entries may follow the
    # last processed_events row by a moment: wait for the cache to settle, then compare.
    connected = {u for u, c in expected.items() if c}

    async def cached_users() -> set[str]:
        return {k.removeprefix("user:") async for k in redis.scan_iter("user:*")}

    async def settled() -> bool:
        return await cached_users() == connected

    with contextlib.suppress(AssertionError):
        await async_wait_until(settled, timeout=15, interval=0.25)
    assert await cached_users() == connected
    rate = len(events) / (done - started)
    report = {
        "events": len(events),
        "publish_s": round(published - started, 2),
        "applied_s": round(done - started, 2),
        "events_per_s": round(rate),
    }
    (Path(__file__).parent.parent.parent / "results").mkdir(exist_ok=True)
    (Path(__file__).parent.parent.parent / "results" / "pipeline_10k.json").write_text(
        json.dumps(report)
    )
    sys.stderr.write(f"pipeline: {report}\n")
