"""The cache reconciler: when a worker committed a change but its Redis write was lost, the API
stops granting on the stale entry within one reconciler period, and leaves current entries be.
Turns continue from the last one that succeeded, however long ago (issue 11), and an entry newer
than PostgreSQL's row (versions gone backwards) is reset to the row (scenario 5)."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from api.cachetrust import refill
from api.reconciler import Reconciler
from sessiond.events import Event
from storage import expiry
from storage.cache import Cache, UserSnapshot, user_key, version_key
from storage.reconcile import LOCK_KEY, MARK_KEY, reconcile
from storage.state import apply_event, load_snapshot, publish_snapshot
from tests.api.conftest import Api, ApiFactory, mint
from tests.api.test_api_access import assert_forbidden

pytestmark = pytest.mark.integration


async def lost_write(kind: str, user_id: str, session_id: str | None = None) -> None:
    """The change commits in PostgreSQL; the worker's Redis sync never happens."""
    await apply_event(
        Event(kind=kind, user_id=user_id, session_id=session_id, occurred_at=datetime.now(UTC))  # type: ignore[arg-type]
    )


async def turn(api: Api) -> int:
    await api.cache.client.delete(LOCK_KEY)
    return await api.app.ctx.reconciler.step()


@pytest.fixture
async def api(api_factory: ApiFactory) -> Api:
    return await api_factory(cache_reconcile_s=0)  # turns are taken by the tests


async def test_a_logout_whose_eviction_was_lost_is_refused_after_one_turn(api: Api) -> None:
    # Given a connected, cached user whose logout committed without its Redis eviction
    await api.event("connected", "42")
    await lost_write("disconnected", "42")
    # The stale entry is what would grant (the hazard the reconciler exists for)
    assert (await api.get("/auth/check", token=mint("42"))).status == 200

    # When the reconciler takes its turn
    assert await turn(api) == 1

    # Then the entry is gone and the user is refused; a second turn has nothing to do
    assert await api.cache.client.exists(user_key("42")) == 0
    assert_forbidden(await api.get("/auth/check", token=mint("42")), "not_connected")
    assert await turn(api) == 0
    assert api.app.ctx.metrics.reconciled.get() == 1


async def test_a_revoked_session_of_a_connected_user_is_refused_after_one_turn(api: Api) -> None:
    # Given a user on two devices, and the phone's logout lost on its way to Redis
    await api.event("connected", "7", session_id="phone")
    await api.event("connected", "7", session_id="laptop")
    await lost_write("disconnected", "7", "phone")
    assert (await api.get("/auth/check", token=mint("7", sid="phone"))).status == 200

    # When the reconciler takes its turn
    assert await turn(api) == 1

    # Then the phone's token is refused and the laptop's still passes, from a fresh entry
    assert_forbidden(await api.get("/auth/check", token=mint("7", sid="phone")), "session_ended")
    assert (await api.get("/auth/check", token=mint("7", sid="laptop"))).status == 200
    assert await api.cache.client.exists(user_key("7")) == 1


async def test_current_entries_are_left_alone(api: Api) -> None:
    # Given users whose changes all reached Redis
    await api.event("connected", "1")
    await api.event("connected", "2")
    await api.event("disconnected", "2")
    # When the reconciler takes its turn, it evicts nothing
    assert await turn(api) == 0
    assert await api.cache.client.exists(user_key("1")) == 1


async def test_one_process_per_period_takes_the_turn(api: Api) -> None:
    # Given three API processes, and the logouts of two cached users lost on their way to Redis
    for user in ("42", "43"):
        await api.event("connected", user)
    metrics = api.app.ctx.metrics
    first, *others = [Reconciler(api.cache, metrics, period_s=30) for _ in range(3)]
    await lost_write("disconnected", "42")
    await api.cache.client.delete(LOCK_KEY)

    # When the first takes the period's turn
    assert await first.step() == 1
    await lost_write("disconnected", "43")

    # Then the others do nothing within the period: user 43's stale entry is still there
    assert [await r.step() for r in others] == [0, 0]
    assert await api.cache.client.exists(user_key("43")) == 1
    assert 0 < await api.cache.client.pttl(LOCK_KEY) <= 30_000
    # Until the lock lapses: the next turn evicts it
    assert await turn(api) == 1


def number(raw: bytes | str | None) -> int:
    assert raw is not None
    return int(raw)


OLD_WINDOW_S = 10.0  # the fixed look-back of the reconciler before issue 11


async def test_turns_continue_from_the_last_success_after_an_outage(
    api_factory: ApiFactory,
) -> None:
    # Given an API whose reconciler took a turn, then stopped (the API, or its reconciler, down)
    first = await api_factory(cache_reconcile_s=0)
    await first.event("connected", "42")
    await turn(first)
    mark = number(await first.cache.client.get(MARK_KEY))
    await first.app.ctx.reconciler.stop()
    # And a logout whose Redis eviction was lost while nobody reconciled, for longer than the
    # old fixed window
    await lost_write("disconnected", "42")
    await asyncio.sleep(OLD_WINDOW_S + 1)
    assert (await first.get("/auth/check", token=mint("42"))).status == 200  # the hazard

    # When the next turn comes, however late
    done = await reconcile(first.cache)

    # Then it started where the last one ended, and the user is refused
    assert (done.full, done.start, done.evicted) == (False, mark, 1)
    assert done.horizon > mark
    assert_forbidden(await first.get("/auth/check", token=mint("42")), "not_connected")


async def test_an_entry_newer_than_postgres_is_reset_when_the_row_changes(api: Api) -> None:
    # Given a connected user whose cached entry carries a version PostgreSQL never reached (a
    # failover to a standby that had not seen the last changes)
    await api.event("connected", "5")
    await turn(api)
    ahead = await load_snapshot("5")
    assert ahead is not None
    await api.cache.sync(UserSnapshot("5", "connected", ahead.version + 10))
    # When PostgreSQL commits a logout (at a lower version: the worker's eviction is refused)
    await api.event("disconnected", "5")
    row = await load_snapshot("5")
    assert row is not None and row.status == "disconnected" and row.version < ahead.version + 10
    assert (await api.get("/auth/check", token=mint("5"))).status == 200  # the hazard

    # Then one turn resets the entry to the row, and the user is refused
    assert await turn(api) == 1
    assert_forbidden(await api.get("/auth/check", token=mint("5")), "not_connected")
    assert number(await api.cache.client.get(version_key("5"))) == row.version
    # And the user's next login is cached again (its version is no longer refused)
    await api.event("connected", "5")
    assert (await api.get("/auth/check", token=mint("5"))).status == 200
    assert await api.cache.client.exists(user_key("5")) == 1


async def restore(pg: asyncpg.Connection, user_id: str, row: asyncpg.Record, hwm: str) -> None:
    """Puts a user's row (and their sessions, all ended) and the reconciler's stored mark back
    as a restore of an older backup would: the rows as they were, ``change_xid`` included."""
    await pg.execute("ALTER TABLE users DISABLE TRIGGER users_changed")
    try:
        await pg.execute(
            "UPDATE users SET status = $2, version = $3, change_xid = $4::text::xid8"
            " WHERE id = $1",
            user_id, row["status"], row["version"], row["xid"],
        )  # fmt: skip
    finally:
        await pg.execute("ALTER TABLE users ENABLE TRIGGER users_changed")
    await pg.execute(
        "UPDATE sessions SET status = 'ended', ended_at = now() WHERE user_id = $1", user_id
    )
    await pg.execute("UPDATE cache_reconcile SET hwm = $1::text::xid8", hwm)


async def test_a_postgres_restore_is_caught_by_the_mark(api: Api, pg: asyncpg.Connection) -> None:
    # Given a user who logged out, and a backup taken then (their row, the stored mark)
    await api.event("connected", "9")
    await api.event("disconnected", "9")
    await turn(api)
    backup = await pg.fetchrow(
        "SELECT status, version, change_xid::text AS xid FROM users WHERE id = '9'"
    )
    hwm = await pg.fetchval("SELECT hwm::text FROM cache_reconcile")
    # And a login after it, cached, and a few turns
    await api.event("connected", "9")
    await turn(api)
    await turn(api)
    # When PostgreSQL is restored from that backup: it says disconnected at a lower version
    # than Redis has seen, and nothing changed since the restore
    await restore(pg, "9", backup, hwm)
    assert (await api.get("/auth/check", token=mint("9"))).status == 200  # the hazard

    # Then the next turn sees Redis's mark ahead of PostgreSQL's, compares everything cached,
    # and the user is refused
    assert await turn(api) == 1
    assert_forbidden(await api.get("/auth/check", token=mint("9")), "not_connected")
    assert number(await api.cache.client.get(MARK_KEY)) <= int(
        await pg.fetchval("SELECT hwm::text FROM cache_reconcile")
    )


async def test_a_redis_without_mark_is_compared_whole(api: Api) -> None:
    # Given a Redis that lost its mark (restored from an old snapshot, say) and holds an entry
    # of a user PostgreSQL has disconnected long ago, and one of a user PostgreSQL never knew
    await api.event("connected", "3")
    await api.event("disconnected", "3")
    await api.event("connected", "4")  # and a current one
    await turn(api)
    await api.cache.client.set(version_key("3"), 1)  # the snapshot's past: "3" connected at v1
    await api.cache.sync(UserSnapshot("3", "connected", 1))
    await api.cache.sync(UserSnapshot("nobody", "connected", 4))
    await api.cache.client.delete(MARK_KEY)

    # When a turn runs
    done = await reconcile(api.cache)

    # Then both stale entries are gone, the current one stays, and the mark is back
    # (the gone mark the eviction of "3" leaves is seen by the scan of the marks too)
    assert (done.full, done.checked, done.evicted, done.reset) == (True, 4, 1, 1)
    assert await api.cache.client.exists(user_key("3"), user_key("nobody")) == 0
    assert await api.cache.client.exists(user_key("4")) == 1
    assert number(await api.cache.client.get(MARK_KEY)) == done.horizon


async def test_a_refused_refill_is_not_served(api: Api) -> None:
    # Given a row read, then overtaken by a logout that reached Redis
    await api.event("connected", "8")
    stale = await load_snapshot("8")
    assert stale is not None and stale.connected
    await api.event("disconnected", "8")
    access = api.app.ctx.access

    # When the stale read is written back, the guard refuses it: the row is read again
    answer = await refill(api.cache, access.trust, stale, load_snapshot)

    # Then what the caller decides on is the fresh row, and Redis keeps the logout
    assert answer is not None and answer.status == "disconnected"
    assert await api.cache.client.exists(user_key("8")) == 0


async def test_a_refused_refill_of_a_version_postgres_lost_repairs_the_cache(api: Api) -> None:
    # Given a connected user whose cached version is newer than PostgreSQL's, entry gone (a
    # failover to a lagging standby, then an eviction): every refill would be refused
    await api.event("connected", "6")
    row = await load_snapshot("6")
    assert row is not None
    await api.cache.sync(UserSnapshot("6", "disconnected", row.version + 5))
    await api.cache.client.delete("gone:6")

    # When the user's token comes, PostgreSQL answers; the version goes back to PostgreSQL's
    assert (await api.get("/auth/check", token=mint("6"))).status == 200
    assert number(await api.cache.client.get(version_key("6"))) == row.version

    # Then the next miss refills, and the one after is a cache hit
    assert (await api.get("/auth/check", token=mint("6"))).status == 200
    hits = api.app.ctx.metrics.cache.get("hit")
    assert (await api.get("/auth/check", token=mint("6"))).status == 200
    assert api.app.ctx.metrics.cache.get("hit") == hits + 1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_sweep_eviction_that_failed_is_done_by_the_next_turn(api: Api) -> None:
    # Given a connected, cached user, and a sweep that cannot reach Redis for its evictions
    # (the activity lock and buffer are on the reachable one)
    await api.event("connected", "11")
    await turn(api)
    unreachable = Cache(aioredis.Redis(port=closed_port(), socket_timeout=1), ttl_s=60)
    later = datetime.now(UTC) + timedelta(seconds=api.settings.idle_timeout_s + 60)

    # When the sweep expires the user (as if the idle timeout had passed): PostgreSQL commits,
    # the eviction fails
    with pytest.raises(RedisConnectionError):
        await expiry.sweep(
            unreachable, api.app.ctx.activity, now=later,
            idle_timeout_s=api.settings.idle_timeout_s, batch_size=100,
        )  # fmt: skip
    await unreachable.close()
    row = await load_snapshot("11")
    assert row is not None and row.status == "disconnected"
    assert (await api.get("/auth/check", token=mint("11"))).status == 200  # the hazard

    # Then the next reconciler turn evicts it, from the mark
    assert await turn(api) == 1
    assert_forbidden(await api.get("/auth/check", token=mint("11")), "not_connected")


async def test_publish_after_commit_hands_a_failed_eviction_over(api: Api) -> None:
    # Given an admin change committed, and a Redis that fails the eviction
    await api.event("connected", "12")
    outcome = await apply_event(
        Event(kind="disconnected", user_id="12", occurred_at=datetime.now(UTC))  # type: ignore[arg-type]
    )
    unreachable = Cache(aioredis.Redis(port=closed_port(), socket_timeout=1), ttl_s=60)
    reconciler = Reconciler(
        unreachable, api.app.ctx.metrics, period_s=0, on_unavailable=api.app.ctx.access.trust.failed
    )
    # When it is published, nothing is raised and this process stops trusting Redis
    await reconciler.publish(outcome)
    await unreachable.close()
    assert api.app.ctx.access.redis_down
    # Then, Redis being reachable, the probe catches up before trusting it again
    for _ in range(100):
        if not api.app.ctx.access.redis_down:
            break
        await asyncio.sleep(0.1)
    assert not api.app.ctx.access.redis_down
    assert await api.cache.client.exists(user_key("12")) == 0
    assert_forbidden(await api.get("/auth/check", token=mint("12")), "not_connected")
    await publish_snapshot(api.cache, outcome)  # a no-op now: already evicted
