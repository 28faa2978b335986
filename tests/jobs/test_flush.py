"""The activity flush on real PostgreSQL and Redis: batched, monotonic, lossless."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from sessiond.config import Settings
from storage import cache as cache_mod
from storage import flush
from storage.activity import ACTIVITY_KEY, AccessLog, ActivityBuffer
from tests.jobs.conftest import NOW, connect_user, user_row

pytestmark = pytest.mark.integration


async def test_flush_moves_both_timestamps_forward_without_a_state_change(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer, pg: asyncpg.Connection
) -> None:
    # Given a connected user with a request buffered in Redis
    await connect_user(cache, "u1", NOW - timedelta(minutes=10))
    before = await user_row(pg, "u1")
    await buffer.touch("u1", at=(NOW - timedelta(seconds=2)).timestamp())

    # When the flush runs
    result = await flush.flush_activity(buffer)

    # Then last_activity_at and seen_at moved, the version did not, and the buffer is empty
    assert (result.activity_entries, result.users_updated, result.skipped) == (1, 1, False)
    row = await user_row(pg, "u1")
    assert row["last_activity_at"] == row["seen_at"] == NOW - timedelta(seconds=2)
    assert row["version"] == before["version"] and row["status"] == "connected"
    assert await cache.client.keys("*activity*") == []


async def test_flush_never_moves_a_timestamp_backwards(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer, pg: asyncpg.Connection
) -> None:
    # Given a user whose row already holds a newer activity than the buffered one
    await connect_user(cache, "u1", NOW - timedelta(minutes=10))
    await pg.execute("UPDATE users SET last_activity_at = $1, seen_at = $1 WHERE id = 'u1'", NOW)
    await buffer.touch("u1", at=(NOW - timedelta(minutes=1)).timestamp())

    # When the flush runs (twice: a replay is a no-op too)
    first = await flush.flush_activity(buffer)
    await buffer.touch("u1", at=(NOW - timedelta(minutes=1)).timestamp())
    second = await flush.flush_activity(buffer)

    # Then nothing was written
    assert (first.users_updated, second.users_updated) == (0, 0)
    row = await user_row(pg, "u1")
    assert row["last_activity_at"] == row["seen_at"] == NOW


async def test_ten_thousand_requests_by_one_user_are_one_row_update(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer, pg: asyncpg.Connection
) -> None:
    # Given 10,000 granted requests by one user between two flushes
    await connect_user(cache, "u1", NOW - timedelta(minutes=10))
    base = NOW.timestamp()
    xmin_before = await pg.fetchval("SELECT xmin::text FROM users WHERE id = 'u1'")
    for i in range(10_000):
        await buffer.touch("u1", at=base + i / 1000)

    # When the flush runs
    result = await flush.flush_activity(buffer)

    # Then one entry was drained and one row version written, holding the newest request
    assert (result.activity_entries, result.users_updated, result.batches) == (1, 1, 1)
    assert await pg.fetchval("SELECT xmin::text FROM users WHERE id = 'u1'") != xmin_before
    row = await user_row(pg, "u1")
    assert row["last_activity_at"] == datetime.fromtimestamp(base + 9.999, tz=UTC)


async def test_flush_racing_with_new_activity_loses_nothing_and_never_goes_back(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer, pg: asyncpg.Connection
) -> None:
    # Given 50 connected users
    users = [f"r{i}" for i in range(50)]
    for uid in users:
        await connect_user(cache, uid, NOW - timedelta(minutes=10))
    newest: dict[str, float] = {}
    seen: dict[str, datetime] = {}
    stop = asyncio.Event()
    regressions: list[str] = []
    reading = asyncio.Lock()  # one asyncpg connection serves both flushers' reads

    async def requests(worker: int) -> None:
        # Each user's requests carry increasing times; touches interleave with the renames.
        rng = random.Random(worker)
        tick = 0
        while not stop.is_set():
            tick += 1
            uid = rng.choice(users)
            at = NOW.timestamp() + tick * 0.001 + worker * 1e-6
            await buffer.touch(uid, at=at)
            newest[uid] = max(newest.get(uid, 0.0), at)

    async def flusher() -> int:
        flushes = 0
        while not stop.is_set():
            await flush.flush_activity(buffer, lock_wait_s=1.0)
            flushes += 1
            async with reading:
                rows = await pg.fetch("SELECT id, last_activity_at FROM users")
            for row in rows:
                at = row["last_activity_at"]
                if at is not None and row["id"] in seen and at < seen[row["id"]]:
                    regressions.append(row["id"])
                if at is not None:
                    seen[row["id"]] = at
        return flushes

    # When requests keep arriving while flushes run (from two concurrent flushers)
    tasks = [asyncio.create_task(requests(w)) for w in range(4)]
    flushers = [asyncio.create_task(flusher()) for _ in range(2)]
    await asyncio.sleep(2.0)
    stop.set()
    await asyncio.gather(*tasks)
    flush_counts = await asyncio.gather(*flushers)
    await flush.flush_activity(buffer, lock_wait_s=5.0)

    # Then every user's newest request reached PostgreSQL and no timestamp ever went back
    assert sum(flush_counts) > 5
    assert regressions == []
    rows = {r["id"]: r for r in await pg.fetch("SELECT * FROM users")}
    for uid, at in newest.items():
        expected = datetime.fromtimestamp(at, tz=UTC)
        got = rows[uid]["last_activity_at"]
        assert abs((got - expected).total_seconds()) < 1e-5, (uid, got, expected)
        assert rows[uid]["seen_at"] == got
    assert await cache.client.exists(ACTIVITY_KEY) == 0


async def test_the_cached_snapshot_gets_the_activity_without_a_new_version(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer
) -> None:
    # Given a cached user connected 40 minutes ago who made a request a minute ago
    await connect_user(cache, "u1", NOW - timedelta(minutes=40))
    before = await cache.get("u1")
    ttl_before = await cache.client.ttl("user:u1")
    await buffer.touch("u1", at=(NOW - timedelta(minutes=1)).timestamp())

    # When the flush runs (and the pending entry is gone)
    result = await flush.flush_activity(buffer)

    # Then the cache itself says the user was active a minute ago, at the same version and TTL,
    # so an idle check reading the cache still sees that activity
    after = await cache.get("u1")
    assert before is not None and after is not None
    assert result.cache_refreshed == 1 and await buffer.pending("u1") is None
    assert after.seen_at == after.last_activity_at == NOW - timedelta(minutes=1)
    assert after.version == before.version and after.sessions == before.sessions
    assert 0 < await cache.client.ttl("user:u1") <= ttl_before


async def test_a_request_during_the_flush_keeps_its_newer_entry(
    db: Settings,
    cache: cache_mod.Cache,
    buffer: ActivityBuffer,
    pg: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a buffered request, and another one by the same user landing while the flush writes
    await connect_user(cache, "u1", NOW - timedelta(minutes=10))
    await buffer.touch("u1", at=(NOW - timedelta(seconds=9)).timestamp())
    real_write = flush.write_activity

    async def write_then_request(*args: Any, **kwargs: Any) -> tuple[int, int]:
        done = await real_write(*args, **kwargs)
        await buffer.touch("u1", at=(NOW - timedelta(seconds=1)).timestamp())
        return done

    monkeypatch.setattr(flush, "write_activity", write_then_request)

    # When the flush runs
    await flush.flush_activity(buffer)

    # Then the newer request is still pending, and the next flush writes it
    monkeypatch.undo()
    assert await buffer.pending("u1") == NOW - timedelta(seconds=1)
    assert (await user_row(pg, "u1"))["seen_at"] == NOW - timedelta(seconds=9)
    await flush.flush_activity(buffer)
    assert (await user_row(pg, "u1"))["seen_at"] == NOW - timedelta(seconds=1)
    assert await buffer.pending("u1") is None


async def test_a_crash_after_the_commit_replays_harmlessly(
    db: Settings,
    cache: cache_mod.Cache,
    buffer: ActivityBuffer,
    pg: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a flush that dies after its commit, before deleting the entries
    await connect_user(cache, "u1", NOW - timedelta(minutes=10))
    await buffer.touch("u1", at=(NOW - timedelta(seconds=5)).timestamp())

    async def crash(*args: object, **kwargs: object) -> None:
        raise ConnectionError("redis went away")

    monkeypatch.setattr(flush, "forget", crash)
    with pytest.raises(ConnectionError):
        await flush.flush_activity(buffer)
    monkeypatch.undo()

    # When the next flush runs
    result = await flush.flush_activity(buffer)

    # Then it replays the entry without writing the row again, and deletes it
    assert (result.activity_entries, result.users_updated) == (1, 0)
    assert (await user_row(pg, "u1"))["last_activity_at"] == NOW - timedelta(seconds=5)
    assert await buffer.pending("u1") is None


async def test_a_failed_write_keeps_the_entries(
    db: Settings,
    cache: cache_mod.Cache,
    buffer: ActivityBuffer,
    pg: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a buffered request and a database that fails the write
    await connect_user(cache, "u1", NOW - timedelta(minutes=10))
    await buffer.touch("u1", at=NOW.timestamp())

    async def broken(*args: object, **kwargs: object) -> tuple[int, int]:
        raise ConnectionError("database went away")

    monkeypatch.setattr(flush, "write_activity", broken)

    # When the flush runs
    with pytest.raises(ConnectionError):
        await flush.flush_activity(buffer)

    # Then the entry is still pending for the API, the sweep and the next flush
    monkeypatch.undo()
    assert await buffer.pending("u1") == NOW
    assert (await flush.flush_activity(buffer)).users_updated == 1


async def test_access_decisions_are_journaled_in_batches_without_secrets(
    db: Settings, cache: cache_mod.Cache, access_log: AccessLog, pg: asyncpg.Connection
) -> None:
    # Given access decisions recorded by the API, one of them carrying fields never to journal
    await access_log.record(
        {"at": NOW.timestamp(), "user_id": "u1", "session_id": "phone", "decision": "allow",
         "reason": None, "route": "/api/me", "status": 200}
    )  # fmt: skip
    await access_log.record(
        {"at": NOW.isoformat(), "user_id": "u2", "decision": "deny", "reason": "idle_timeout",
         "route": "/auth/check", "token": "eyJhbGciOi.secret", "authorization": "Bearer x"}
    )  # fmt: skip
    for i in range(25):
        await access_log.record({"at": NOW.timestamp(), "user_id": f"b{i}", "decision": "allow"})

    # When the flush runs with a small batch size
    result = await flush.flush_activity(
        ActivityBuffer(cache.client), access_log=access_log, batch_size=10
    )

    # Then every decision is an "access" audit row from the api, and no secret reached the table
    assert (result.access_entries, result.batches) == (27, 3)
    rows = await pg.fetch("SELECT * FROM audit_events WHERE kind = 'access' ORDER BY id")
    assert len(rows) == 27 and {r["source"] for r in rows} == {"api"}
    first, second = rows[0], rows[1]
    assert (first["user_id"], first["session_id"], first["occurred_at"]) == ("u1", "phone", NOW)
    assert first["detail"] == '{"route": "/api/me", "status": 200, "decision": "allow"}'
    assert (second["user_id"], second["reason"]) == ("u2", "idle_timeout")
    assert "secret" not in second["detail"] and "Bearer" not in second["detail"]
    assert await cache.client.keys("*audit:access*") == []


async def test_a_busy_lock_skips_the_flush(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer
) -> None:
    # Given a sweep (or another flush) holding the activity lock
    lock = flush.activity_lock(cache.client)
    assert await lock.acquire()
    await buffer.touch("u1", at=NOW.timestamp())
    try:
        # When a flush is due
        result = await flush.flush_activity(buffer)
    finally:
        await lock.release()

    # Then it skips and leaves the buffer for the next tick
    assert result.skipped and result.activity_entries == 0
    assert await buffer.pending("u1") == NOW
