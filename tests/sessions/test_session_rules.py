"""Session rules on real PostgreSQL and Redis with an injected clock: the concurrent-session limit
(``SESSIOND_MAX_SESSIONS_PER_USER``), the absolute lifetime (``SESSIOND_SESSION_MAX_S``), and the
lifecycle events each change writes to the outbox in its own transaction."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest

from sessiond.config import Settings
from sessiond.events import Event
from storage import cache as cache_mod
from storage import expiry, state
from storage.activity import ActivityBuffer
from tests.sessions.conftest import NOW, kinds, outbox_rows

pytestmark = pytest.mark.integration

HOUR = 3600


async def connect(
    cache: cache_mod.Cache,
    user_id: str,
    session_id: str | None,
    at_s: float,
    *,
    limit: int | None = None,
) -> state.Outcome:
    """A ``connected`` at ``NOW + at_s`` applied as a worker would, with the given limit."""
    outcome = await state.apply_event(
        Event(
            kind="connected",
            user_id=user_id,
            session_id=session_id,
            occurred_at=NOW + timedelta(seconds=at_s),
        ),
        limits=state.Limits(max_sessions_per_user=limit),
    )
    await state.publish_snapshot(cache, outcome)
    return outcome


async def sessions_of(pg: asyncpg.Connection, user_id: str) -> dict[str, tuple[str, str | None]]:
    rows = await pg.fetch(
        "SELECT session_id, status, end_reason FROM sessions WHERE user_id = $1", user_id
    )
    return {r["session_id"]: (r["status"], r["end_reason"]) for r in rows}


async def sweep(
    cache: cache_mod.Cache, *, session_max_s: int | None, idle_s: int = 7 * 24 * HOUR
) -> expiry.SweepResult:
    return await expiry.sweep(
        cache, ActivityBuffer(cache.client), now=NOW, idle_timeout_s=idle_s, batch_size=2,
        session_max_s=session_max_s,
    )  # fmt: skip


# ----------------------------------------------------------------------- concurrent-session limit


async def test_session_beyond_the_limit_ends_the_oldest(
    pg: asyncpg.Connection, cache: cache_mod.Cache
) -> None:
    # Given a limit of 2 and two sessions started at t=0 and t=10
    await connect(cache, "u1", "a", 0, limit=2)
    await connect(cache, "u1", "b", 10, limit=2)
    # When a third session starts at t=20
    outcome = await connect(cache, "u1", "c", 20, limit=2)
    # Then the oldest one ended with reason session_limit and the user keeps the two newest
    assert outcome.ended_sessions == ["a"]
    assert await sessions_of(pg, "u1") == {
        "a": ("ended", "session_limit"),
        "b": ("connected", None),
        "c": ("connected", None),
    }
    cached = await cache.get("u1")
    assert cached is not None and cached.sessions == ["b", "c"]
    # And the events out say so, in order
    assert kinds(await outbox_rows(pg, "u1")) == [
        ("session.started", "a", None),
        ("session.started", "b", None),
        ("session.started", "c", None),
        ("session.ended", "a", "session_limit"),
    ]
    audit = await pg.fetch("SELECT session_id, reason FROM audit_events WHERE reason IS NOT NULL")
    assert [(r["session_id"], r["reason"]) for r in audit] == [("a", "session_limit")]


async def test_limit_of_one_replaces_the_session(
    pg: asyncpg.Connection, cache: cache_mod.Cache
) -> None:
    await connect(cache, "u1", "phone", 0, limit=1)
    await connect(cache, "u1", "laptop", 5, limit=1)
    await connect(cache, "u1", "tablet", 9, limit=1)
    assert await sessions_of(pg, "u1") == {
        "phone": ("ended", "session_limit"),
        "laptop": ("ended", "session_limit"),
        "tablet": ("connected", None),
    }
    row = await pg.fetchrow("SELECT status FROM users WHERE id = 'u1'")
    assert row is not None and row["status"] == "connected"


async def test_repeated_connect_of_an_open_session_is_not_a_new_session(
    pg: asyncpg.Connection, cache: cache_mod.Cache
) -> None:
    await connect(cache, "u1", "a", 0, limit=2)
    await connect(cache, "u1", "b", 1, limit=2)
    # When session a logs in again (a newer event of the same, still open session)
    outcome = await connect(cache, "u1", "a", 2, limit=2)
    # Then nothing ends and no second session.started is written
    assert outcome.ended_sessions == []
    assert [s for s, _ in (await sessions_of(pg, "u1")).values()] == ["connected", "connected"]
    assert len(await outbox_rows(pg, "u1")) == 2


async def test_unlimited_by_default(
    pg: asyncpg.Connection, cache: cache_mod.Cache, settings: Settings
) -> None:
    assert settings.max_sessions_per_user is None
    for i in range(5):
        outcome = await state.apply_event(
            Event(kind="connected", user_id="u1", session_id=f"s{i}", occurred_at=NOW)
        )
    assert outcome.snapshot is not None and len(outcome.snapshot.sessions) == 5


async def test_the_limit_ends_sessions_even_with_newer_events_applied(
    pg: asyncpg.Connection, cache: cache_mod.Cache
) -> None:
    # Given session a whose newest event (t=50) is newer than the login that exceeds the limit
    await connect(cache, "u1", "a", 0, limit=1)
    await connect(cache, "u1", "a", 50, limit=1)
    # When a login at t=20 (delivered late) starts session b
    outcome = await connect(cache, "u1", "b", 20, limit=1)
    # Then a still ends: the rule decides, not the event order
    assert outcome.ended_sessions == ["a"]
    assert (await sessions_of(pg, "u1"))["a"] == ("ended", "session_limit")


# ---------------------------------------------------------------------------- absolute lifetime


async def test_sweep_ends_sessions_past_their_lifetime(
    pg: asyncpg.Connection, cache: cache_mod.Cache
) -> None:
    # Given u1 with an old (2 h) and a young (10 min) session, u2 with one old session
    await connect(cache, "u1", "old", -2 * HOUR)
    await connect(cache, "u1", "young", -600)
    await connect(cache, "u2", "old", -2 * HOUR)
    before = await pg.fetchval("SELECT version FROM users WHERE id = 'u1'")

    # When the sweep runs at NOW with a lifetime of 1 h
    result = await sweep(cache, session_max_s=HOUR)

    # Then the old sessions ended for max_lifetime; u1 is still connected through the young one
    assert (result.lifetime_sessions_ended, result.lifetime_users_disconnected) == (2, 1)
    assert await sessions_of(pg, "u1") == {
        "old": ("ended", "max_lifetime"),
        "young": ("connected", None),
    }
    users = {r["id"]: r for r in await pg.fetch("SELECT * FROM users")}
    assert users["u1"]["status"] == "connected" and users["u1"]["version"] == before + 1
    assert users["u2"]["status"] == "disconnected" and users["u2"]["disconnected_at"] == NOW
    # And both cache entries were evicted, so the next request reloads the shorter list; only
    # u2, disconnected, is marked gone
    assert await cache.get("u1") is None and await cache.get("u2") is None
    assert (await cache.is_gone("u1"), await cache.is_gone("u2")) == (False, True)
    reloaded = await state.load_snapshot("u1")
    assert reloaded is not None and reloaded.sessions == ["young"]
    # And journaled and announced
    audit = await pg.fetch(
        "SELECT user_id, session_id FROM audit_events WHERE reason = 'max_lifetime' ORDER BY id"
    )
    assert sorted((r["user_id"], r["session_id"]) for r in audit) == [("u1", "old"), ("u2", "old")]
    assert kinds(await outbox_rows(pg, "u1"))[-1] == ("session.ended", "old", "max_lifetime")
    assert kinds(await outbox_rows(pg, "u2"))[-2:] == [
        ("session.ended", "old", "max_lifetime"),
        ("user.disconnected", None, "max_lifetime"),
    ]
    # And a second sweep finds nothing more to do
    again = await sweep(cache, session_max_s=HOUR)
    assert again.lifetime_sessions_ended == 0


async def test_lifetime_is_off_by_default(
    pg: asyncpg.Connection, cache: cache_mod.Cache, settings: Settings
) -> None:
    assert settings.session_max_s is None
    await connect(cache, "u1", "ancient", -30 * 24 * HOUR)
    await pg.execute("UPDATE users SET seen_at = $1", NOW)  # not idle, by either idle rule
    await pg.execute("UPDATE sessions SET last_seen_at = $1", NOW)
    result = await sweep(cache, session_max_s=settings.session_max_s)
    assert result.lifetime_sessions_ended == 0 and result.expired == 0
    assert await sessions_of(pg, "u1") == {"ancient": ("connected", None)}


async def test_lifetime_dry_run_changes_nothing(
    pg: asyncpg.Connection, cache: cache_mod.Cache
) -> None:
    await connect(cache, "u1", "old", -2 * HOUR)
    result = await expiry.sweep(
        cache, ActivityBuffer(cache.client), now=NOW, idle_timeout_s=7 * 24 * HOUR,
        batch_size=10, dry_run=True, session_max_s=HOUR,
    )  # fmt: skip
    assert result.lifetime_sessions_ended == 1 and result.users == ["u1"]
    assert await sessions_of(pg, "u1") == {"old": ("connected", None)}


async def test_lifetime_walks_many_users_in_batches(
    pg: asyncpg.Connection, cache: cache_mod.Cache
) -> None:
    for i in range(7):
        await connect(cache, f"u{i}", None, -2 * HOUR)
    result = await sweep(cache, session_max_s=HOUR)  # batch size 2
    assert (result.lifetime_sessions_ended, result.lifetime_users_disconnected) == (7, 7)
    assert await pg.fetchval("SELECT count(*) FROM users WHERE status = 'connected'") == 0
    # The implicit session goes out as session_id null
    assert kinds(await outbox_rows(pg, "u3"))[-2:] == [
        ("session.ended", None, "max_lifetime"),
        ("user.disconnected", None, "max_lifetime"),
    ]


# ------------------------------------------------------------------------------- events written


async def test_idle_expiry_writes_its_events_in_the_same_transaction(
    pg: asyncpg.Connection, cache: cache_mod.Cache
) -> None:
    await connect(cache, "u1", "a", -3 * HOUR)
    await connect(cache, "u1", "b", -3 * HOUR + 1)
    await sweep(cache, session_max_s=None, idle_s=HOUR)
    rows = await outbox_rows(pg, "u1")
    assert kinds(rows) == [
        ("session.started", "a", None),
        ("session.started", "b", None),
        ("session.ended", "a", "idle_timeout"),
        ("session.ended", "b", "idle_timeout"),
        ("user.disconnected", None, "idle_timeout"),
    ]
    assert rows[-1]["occurred_at"] == NOW


async def test_logout_and_admin_disconnect_write_their_events(
    pg: asyncpg.Connection, cache: cache_mod.Cache
) -> None:
    await connect(cache, "u1", "a", 0)
    await state.apply_event(
        Event(kind="disconnected", user_id="u1", session_id="a", occurred_at=NOW + timedelta(1))
    )
    await connect(cache, "u2", "x", 0)
    await connect(cache, "u2", "y", 1)
    await state.force_disconnect("u2", reason="admin", source="admin", at=NOW + timedelta(1))
    assert kinds(await outbox_rows(pg, "u1")) == [
        ("session.started", "a", None),
        ("session.ended", "a", "logout"),
        ("user.disconnected", None, "logout"),
    ]
    assert kinds(await outbox_rows(pg, "u2"))[2:] == [
        ("session.ended", "x", "admin"),
        ("session.ended", "y", "admin"),
        ("user.disconnected", None, "admin"),
    ]


async def test_no_event_without_a_change(pg: asyncpg.Connection, cache: cache_mod.Cache) -> None:
    event = Event(kind="connected", user_id="u1", session_id="a", occurred_at=NOW, event_id="e1")
    await state.apply_event(event)
    await state.apply_event(event)  # duplicate
    await state.apply_event(  # stale
        Event(kind="connected", user_id="u1", session_id="a", occurred_at=NOW - timedelta(1))
    )
    # A logout of a session never seen leaves a tombstone, and nothing to announce
    await state.apply_event(
        Event(kind="disconnected", user_id="u9", session_id="z", occurred_at=NOW)
    )
    assert kinds(await outbox_rows(pg)) == [("session.started", "a", None)]


async def test_a_rolled_back_change_leaves_no_event(
    pg: asyncpg.Connection, cache: cache_mod.Cache
) -> None:
    await connect(cache, "u1", "a", 0)
    with pytest.raises(RuntimeError):
        async with state.unit_of_work() as work:
            await work.load(["u1"])
            work.end_sessions("u1", at=NOW, reason="logout", source="test")
            await work.save()  # written, then rolled back with the transaction
            raise RuntimeError("crash before commit")
    assert kinds(await outbox_rows(pg, "u1")) == [("session.started", "a", None)]
    assert await sessions_of(pg, "u1") == {"a": ("connected", None)}
