"""The per-session idle timeout (CONTRACT §8, the default ``SESSIOND_IDLE_SCOPE=session``) on real
PostgreSQL and Redis: the flush and the sweep, with an injected clock. The per-user rule is
``test_expiry.py``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import asyncpg
import pytest

from sessiond.config import IdleScope, Settings
from storage import cache as cache_mod
from storage import expiry, flush
from storage.activity import ActivityBuffer
from tests.jobs.conftest import NOW, connect_user, user_row

pytestmark = pytest.mark.integration

IDLE = 1800


async def sweep(
    cache: cache_mod.Cache,
    buffer: ActivityBuffer,
    *,
    scope: IdleScope = "session",
    dry_run: bool = False,
    batch: int = 500,
) -> expiry.SweepResult:
    return await expiry.sweep(
        cache, buffer, now=NOW, idle_timeout_s=IDLE, batch_size=batch, dry_run=dry_run,
        idle_scope=scope,
    )  # fmt: skip


async def sessions(pg: asyncpg.Connection, user_id: str) -> dict[str, tuple[str, str | None]]:
    rows = await pg.fetch(
        "SELECT session_id, status, end_reason FROM sessions WHERE user_id = $1", user_id
    )
    return {r["session_id"]: (r["status"], r["end_reason"]) for r in rows}


async def two_devices(cache: cache_mod.Cache, buffer: ActivityBuffer, user: str) -> None:
    """A user who logged in on a phone and a laptop 40 minutes ago and kept using the laptop
    (a request a minute ago, flushed to PostgreSQL), never the phone."""
    await connect_user(cache, user, NOW - timedelta(minutes=40), session_id="phone")
    await connect_user(cache, user, NOW - timedelta(minutes=40), session_id="laptop")
    await buffer.touch(user, (NOW - timedelta(minutes=1)).timestamp(), session_id="laptop")
    await flush.flush_activity(buffer)


async def test_the_abandoned_session_ends_and_the_used_one_stays(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer, pg: asyncpg.Connection
) -> None:
    # Given a user active on one device only
    await two_devices(cache, buffer, "u")
    version = (await user_row(pg, "u"))["version"]

    # When the sweep runs
    result = await sweep(cache, buffer)

    # Then the abandoned session ended for idle_timeout, journaled and announced; the user stays
    # connected with the other one, and its cache entry is evicted, not marked gone
    assert (result.expired, result.sessions_ended, result.idle_users_disconnected) == (1, 1, 0)
    assert await sessions(pg, "u") == {
        "phone": ("ended", "idle_timeout"),
        "laptop": ("connected", None),
    }
    row = await user_row(pg, "u")
    assert row["status"] == "connected" and row["version"] == version + 1
    audit = await pg.fetch("SELECT session_id, reason FROM audit_events WHERE kind = 'expired'")
    assert [(a["session_id"], a["reason"]) for a in audit] == [("phone", "idle_timeout")]
    out = await pg.fetch("SELECT type, session_id, reason FROM outbox WHERE user_id = 'u'")
    assert [(o["type"], o["session_id"], o["reason"]) for o in out][-1] == (
        "session.ended",
        "phone",
        "idle_timeout",
    )
    assert "user.disconnected" not in {o["type"] for o in out}
    assert await cache.get("u") is None and not await cache.is_gone("u")


async def test_the_user_scope_keeps_both_sessions(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer, pg: asyncpg.Connection
) -> None:
    # Given the same user
    await two_devices(cache, buffer, "u")

    # When the sweep runs with SESSIOND_IDLE_SCOPE=user
    result = await sweep(cache, buffer, scope="user")

    # Then nothing ended: the user as a whole was active a minute ago
    assert (result.expired, result.sessions_ended) == (0, 0)
    assert await sessions(pg, "u") == {"phone": ("connected", None), "laptop": ("connected", None)}


async def test_the_last_idle_session_disconnects_the_user(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer, pg: asyncpg.Connection
) -> None:
    # Given a user whose both sessions are idle
    await connect_user(cache, "u", NOW - timedelta(minutes=50), session_id="a")
    await connect_user(cache, "u", NOW - timedelta(minutes=45), session_id="b")

    # When the sweep runs
    result = await sweep(cache, buffer)

    # Then both ended, the user is disconnected, announced and marked gone, as the user rule does
    assert (result.expired, result.sessions_ended, result.idle_users_disconnected) == (1, 2, 1)
    assert (await user_row(pg, "u"))["status"] == "disconnected"
    types = [r["type"] for r in await pg.fetch("SELECT type FROM outbox ORDER BY id")]
    assert types[-3:] == ["session.ended", "session.ended", "user.disconnected"]
    assert await cache.is_gone("u")


async def test_activity_still_in_the_buffer_protects_a_session(
    db: Settings,
    cache: cache_mod.Cache,
    buffer: ActivityBuffer,
    pg: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given two idle-looking sessions; one gets a request after the sweep's initial flush, just
    # before the batch reads the live buffer
    await connect_user(cache, "u", NOW - timedelta(minutes=40), session_id="late")
    await connect_user(cache, "u", NOW - timedelta(minutes=40), session_id="gone")
    real = expiry._pending_sessions

    async def request_lands_first(
        buf: ActivityBuffer, pairs: Sequence[tuple[str, str]]
    ) -> dict[str, dict[str, datetime]]:
        await buffer.touch("u", (NOW - timedelta(seconds=1)).timestamp(), session_id="late")
        return await real(buf, pairs)

    monkeypatch.setattr(expiry, "_pending_sessions", request_lands_first)

    # When the sweep runs
    result = await sweep(cache, buffer)

    # Then the session used a second ago is spared, the other ends
    assert (result.spared, result.sessions_ended) == (1, 1)
    assert await sessions(pg, "u") == {
        "late": ("connected", None),
        "gone": ("ended", "idle_timeout"),
    }
    assert await buffer.pending("u", "late") is not None  # for the next flush


async def test_dry_run_names_the_users_once_and_changes_nothing(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer, pg: asyncpg.Connection
) -> None:
    # Given a user with two idle sessions (batches of one: they come in two batches)
    await connect_user(cache, "u", NOW - timedelta(minutes=50), session_id="a")
    await connect_user(cache, "u", NOW - timedelta(minutes=45), session_id="b")
    before = await pg.fetch("SELECT * FROM sessions ORDER BY id")

    # When a dry run sweeps
    result = await sweep(cache, buffer, dry_run=True, batch=1)

    # Then it names the user once and nothing changed
    assert (result.users, result.expired) == (["u"], 1)
    assert await pg.fetch("SELECT * FROM sessions ORDER BY id") == before


async def test_the_flush_writes_one_update_per_session(
    db: Settings, cache: cache_mod.Cache, buffer: ActivityBuffer, pg: asyncpg.Connection
) -> None:
    # Given two sessions of one user and an ended one, each with many buffered requests
    await connect_user(cache, "u", NOW - timedelta(minutes=10), session_id="a")
    await connect_user(cache, "u", NOW - timedelta(minutes=10), session_id="b")
    xmin = dict(await pg.fetch("SELECT session_id, xmin::text FROM sessions"))
    base = NOW.timestamp()
    for i in range(500):
        for sid in ("a", "b", "never-opened"):
            await buffer.touch("u", base + i / 100, session_id=sid)

    # When the flush runs
    result = await flush.flush_activity(buffer)

    # Then one row version per open session holds its newest request; the unknown one wrote
    # nothing, and the user row is one update as before
    assert (result.session_entries, result.sessions_updated) == (3, 2)
    assert (result.activity_entries, result.users_updated) == (1, 1)
    rows = await pg.fetch("SELECT session_id, last_seen_at, xmin::text AS x FROM sessions")
    assert {r["session_id"] for r in rows} == {"a", "b"}
    for r in rows:
        assert r["x"] != xmin[r["session_id"]]
        assert r["last_seen_at"] == datetime.fromtimestamp(base + 4.99, tz=NOW.tzinfo)
    # And the cached snapshot carries the sessions' times, so the API's check sees them
    cached = await cache.get("u")
    assert cached is not None
    assert set(cached.session_seen.values()) == {datetime.fromtimestamp(base + 4.99, tz=NOW.tzinfo)}
