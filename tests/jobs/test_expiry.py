"""The idle expiry sweep on real PostgreSQL and Redis, with an injected clock: the per-user rule
(``SESSIOND_IDLE_SCOPE=user``, the behaviour before per-session idle timeouts). The per-session
rule, the default, is ``test_expiry_sessions.py``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta

import asyncpg
import pytest

from sessiond.config import Settings
from storage import cache as cache_mod
from storage import expiry, sweeping
from storage.activity import ActivityBuffer
from storage.cache import UserSnapshot
from tests.jobs.conftest import NOW, connect_user, user_row

pytestmark = pytest.mark.integration

IDLE = 1800


async def sweep(
    cache: cache_mod.Cache, buffer: ActivityBuffer, *, dry_run: bool = False, batch: int = 500
) -> expiry.SweepResult:
    return await expiry.sweep(
        cache, buffer, now=NOW, idle_timeout_s=IDLE, batch_size=batch, dry_run=dry_run,
        idle_scope="user",
    )  # fmt: skip


async def test_user_idle_31_minutes_is_expired_evicted_and_journaled(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer, pg: asyncpg.Connection
) -> None:
    # Given a user connected 31 minutes ago, silent since, and cached in Redis
    before = await connect_user(cache, "idle", NOW - timedelta(minutes=31), session_id="phone")
    assert await cache.get("idle") is not None

    # When the sweep runs
    result = await sweep(cache, buffer)

    # Then the user and the session are disconnected for idle_timeout, the key is gone,
    # and the expiry is journaled
    assert (result.expired, result.sessions_ended, result.evicted) == (1, 1, 1)
    row = await user_row(pg, "idle")
    assert row["status"] == "disconnected"
    assert row["disconnected_at"] == NOW
    assert before.snapshot is not None and row["version"] == before.snapshot.version + 1
    session = await pg.fetchrow("SELECT * FROM sessions WHERE user_id = 'idle'")
    assert (session["status"], session["end_reason"], session["ended_at"]) == (
        "ended",
        "idle_timeout",
        NOW,
    )
    assert await cache.client.exists("user:idle") == 0
    assert await cache.is_gone("idle")  # its tokens are refused from Redis alone
    audit = await pg.fetch("SELECT * FROM audit_events WHERE kind = 'expired'")
    assert [(a["user_id"], a["session_id"], a["reason"]) for a in audit] == [
        ("idle", "phone", "idle_timeout")
    ]
    assert audit[0]["occurred_at"] == NOW


async def test_user_idle_29_minutes_is_untouched(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer, pg: asyncpg.Connection
) -> None:
    # Given a user connected 29 minutes ago
    await connect_user(cache, "recent", NOW - timedelta(minutes=29))
    before = await user_row(pg, "recent")

    # When the sweep runs
    result = await sweep(cache, buffer)

    # Then nothing changed
    assert result.expired == 0
    assert await user_row(pg, "recent") == before
    assert await cache.get("recent") is not None
    assert await pg.fetchval("SELECT count(*) FROM audit_events WHERE kind = 'expired'") == 0


async def test_user_whose_last_request_is_only_in_the_buffer_is_untouched(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer, pg: asyncpg.Connection
) -> None:
    # Given a user connected 31 minutes ago whose request a second ago is only in Redis
    await connect_user(cache, "busy", NOW - timedelta(minutes=31))
    await buffer.touch("busy", at=(NOW - timedelta(seconds=1)).timestamp())

    # When the sweep runs
    result = await sweep(cache, buffer)

    # Then the user stays connected and the activity reached PostgreSQL
    assert result.expired == 0
    row = await user_row(pg, "busy")
    assert row["status"] == "connected"
    assert row["seen_at"] == row["last_activity_at"] == NOW - timedelta(seconds=1)
    assert await cache.get("busy") is not None


async def test_activity_arriving_after_the_initial_flush_spares_the_user(
    db: Settings,
    cache: cache_mod.Cache,
    buffer: ActivityBuffer,
    pg: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given an idle user whose request lands after the sweep's initial flush, just before the
    # batch reads the live buffer
    await connect_user(cache, "late", NOW - timedelta(minutes=40))
    real_pending = expiry._pending

    async def request_lands_first(buf: ActivityBuffer, ids: Sequence[str]) -> dict[str, float]:
        await buffer.touch("late", at=(NOW - timedelta(milliseconds=5)).timestamp())
        return await real_pending(buf, ids)

    monkeypatch.setattr(expiry, "_pending", request_lands_first)

    # When the sweep runs
    result = await sweep(cache, buffer)

    # Then the user is spared and its activity is written in the same transaction
    assert (result.expired, result.spared) == (0, 1)
    row = await user_row(pg, "late")
    assert row["status"] == "connected"
    assert row["seen_at"] == NOW - timedelta(milliseconds=5)


async def test_buffered_activity_older_than_the_timeout_does_not_spare(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer, pg: asyncpg.Connection
) -> None:
    # Given a user whose newest buffered request is itself 40 minutes old
    await connect_user(cache, "old", NOW - timedelta(minutes=50))
    await buffer.touch("old", at=(NOW - timedelta(minutes=40)).timestamp())

    # When the sweep runs
    result = await sweep(cache, buffer)

    # Then the user is expired
    assert result.expired == 1
    assert (await user_row(pg, "old"))["status"] == "disconnected"


async def test_every_session_ends_and_each_is_journaled(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer, pg: asyncpg.Connection
) -> None:
    # Given an idle user with two devices
    await connect_user(cache, "multi", NOW - timedelta(minutes=45), session_id="phone")
    await connect_user(cache, "multi", NOW - timedelta(minutes=44), session_id="laptop")

    # When the sweep runs
    result = await sweep(cache, buffer)

    # Then both sessions end, one audit row each
    assert (result.expired, result.sessions_ended) == (1, 2)
    open_sessions = await pg.fetchval("SELECT count(*) FROM sessions WHERE status = 'connected'")
    assert open_sessions == 0
    rows = await pg.fetch(
        "SELECT session_id FROM audit_events WHERE kind = 'expired' ORDER BY session_id"
    )
    assert [r["session_id"] for r in rows] == ["laptop", "phone"]


async def test_dry_run_lists_who_would_expire_and_changes_nothing(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer, pg: asyncpg.Connection
) -> None:
    # Given two idle users and one recent one
    for uid, minutes in (("a", 31), ("b", 60), ("c", 5)):
        await connect_user(cache, uid, NOW - timedelta(minutes=minutes))
    before = await pg.fetch("SELECT * FROM users ORDER BY id")

    # When a dry run sweeps with a batch size that needs several batches
    result = await sweep(cache, buffer, dry_run=True, batch=1)

    # Then it names the idle users, oldest first, and nothing changed
    assert result.users == ["b", "a"] and result.expired == 2
    assert await pg.fetch("SELECT * FROM users ORDER BY id") == before
    assert await cache.get("a") is not None


async def test_a_row_locked_by_an_event_is_skipped_not_waited_for(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer, pg: asyncpg.Connection
) -> None:
    # Given two idle users, one of them locked by a transaction in flight (an event being applied)
    await connect_user(cache, "free", NOW - timedelta(minutes=31))
    await connect_user(cache, "held", NOW - timedelta(minutes=32))
    tx = pg.transaction()
    await tx.start()
    await pg.execute("SELECT 1 FROM users WHERE id = 'held' FOR UPDATE")
    try:
        # When the sweep runs
        started = time.monotonic()
        result = await sweep(cache, buffer)

        # Then it expires the free one at once and leaves the locked one for the next sweep
        assert time.monotonic() - started < 5
        assert result.users == ["free"]
    finally:
        await tx.rollback()
    assert (await sweep(cache, buffer)).users == ["held"]


async def test_an_older_snapshot_cannot_bring_an_expired_user_back(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer
) -> None:
    # Given a user expired by the sweep
    before = await connect_user(cache, "ghost", NOW - timedelta(minutes=31))
    assert before.snapshot is not None
    await sweep(cache, buffer)

    # When a slow writer syncs the snapshot it read before the expiry
    written = await cache.sync(before.snapshot)

    # Then the cache refuses it
    assert written is False
    assert await cache.get("ghost") is None


async def test_a_batch_sync_applies_the_guard_to_each_user(cache: cache_mod.Cache) -> None:
    # Given one user cached at version 5
    assert await cache.sync(UserSnapshot("a", "connected", 5, sessions=["s"]))

    # When a batch brings an older version of it, a new user, and the eviction of a third
    written = await cache.sync_many(
        [
            UserSnapshot("a", "connected", 4, sessions=["old"]),
            UserSnapshot("b", "connected", 1, sessions=["t"]),
            UserSnapshot("c", "disconnected", 2),
        ]
    )

    # Then only the older version is refused, each user on its own
    assert written == [False, True, True]
    a, b = await cache.get("a"), await cache.get("b")
    assert a is not None and (a.version, a.sessions) == (5, ["s"])
    assert b is not None and (b.version, b.sessions) == (1, ["t"])
    assert await cache.get("c") is None


@pytest.mark.slow
async def test_sweep_over_100k_connected_users_expires_exactly_the_10k_stale(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer, pg: asyncpg.Connection
) -> None:
    # Given 100,000 connected users, every tenth one idle for over 30 minutes, some of them cached
    await pg.execute(
        """
        INSERT INTO users (id, status, connected_at, seen_at, last_activity_at, version,
                           created_at, updated_at)
        SELECT 'u' || g, 'connected', $1::timestamptz - interval '2 hours',
               CASE WHEN g % 10 = 0
                    THEN $1::timestamptz - interval '31 minutes' - g * interval '1 ms'
                    ELSE $1::timestamptz - (g % 1790) * interval '1 second' END,
               NULL, 1, now(), now()
        FROM generate_series(1, 100000) AS g
        """,
        NOW,
    )
    await pg.execute(
        """
        INSERT INTO sessions (user_id, session_id, status, started_at, last_event_at, source)
        SELECT 'u' || g, '', 'connected', $1::timestamptz - interval '2 hours',
               $1::timestamptz - interval '2 hours', 'auth'
        FROM generate_series(1, 100000) AS g
        """,
        NOW,
    )
    await pg.execute("ANALYZE users; ANALYZE sessions")
    for g in range(1, 2001):
        await cache.sync(UserSnapshot(user_id=f"u{g}", status="connected", version=1))

    # When one sweep runs with the default batch size
    started = time.monotonic()
    result = await expiry.sweep(
        cache, buffer, now=NOW, idle_timeout_s=IDLE, batch_size=db.expiry_batch_size,
        idle_scope="user",
    )  # fmt: skip
    elapsed = time.monotonic() - started

    # Then exactly the 10,000 stale users are expired, journaled and evicted
    assert result.expired == 10_000 and result.sessions_ended == 10_000
    gone = await pg.fetch("SELECT id FROM users WHERE status = 'disconnected'")
    assert {r["id"] for r in gone} == {f"u{g}" for g in range(10, 100_001, 10)}
    assert await pg.fetchval("SELECT count(*) FROM users WHERE status = 'connected'") == 90_000
    assert await pg.fetchval("SELECT count(*) FROM audit_events WHERE kind = 'expired'") == 10_000
    cached = await cache.client.keys("user:*")
    assert len(cached) == 1800 and b"user:u10" not in cached and b"user:u11" in cached
    assert elapsed < 30, result


async def test_eviction_keeps_a_newer_cache_entry(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer
) -> None:
    # Given users whose cache already holds a version newer than the expiry's (they reconnected
    # and a worker synced them in between), and users at the expiry's version
    for n in range(1500):
        await cache.sync(UserSnapshot(user_id=f"n{n}", status="connected", version=7))
        await cache.sync(UserSnapshot(user_id=f"o{n}", status="connected", version=3))
    rows = [{"id": f"n{n}", "version": 5} for n in range(1500)]
    rows += [{"id": f"o{n}", "version": 4} for n in range(1500)]

    # When the sweep evicts them (in several script calls)
    evicted = await sweeping.evict(cache, rows)

    # Then only the older entries are gone, and their version is remembered
    assert evicted == 1500
    assert await cache.get("n42") is not None and await cache.get("o42") is None
    assert await cache.client.get("uver:o42") == b"4"
