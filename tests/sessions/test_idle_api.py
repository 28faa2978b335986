"""The per-session idle timeout at request time (CONTRACT §8) with the API's injectable clock: an
abandoned device is refused before the sweep runs while the user's other device stays granted,
and whatever activity exists (this process's buffer, Redis's, PostgreSQL's) keeps a session."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import pytest

from storage import expiry, flush
from storage.activity import ActivityBuffer
from tests.api.conftest import Api, ApiFactory, FakeClock, Reply, mint

pytestmark = pytest.mark.integration

IDLE = 600


def reason(reply: Reply) -> tuple[int, str | None]:
    return reply.status, reply.json()["reason"] if reply.body else None


async def check(api: Api, sid: str | None) -> tuple[int, str | None]:
    return reason(await api.get("/auth/check", token=mint("u", sid=sid)))


async def two_devices(api: Api) -> None:
    """Logged in on a phone and a laptop now; the laptop used just before the idle timeout."""
    await api.event("connected", "u", session_id="phone")
    await api.event("connected", "u", session_id="laptop")
    api.clock.advance(IDLE - 100)
    assert await check(api, "laptop") == (200, None)
    await api.app.ctx.recorder.flush()  # the request's activity reaches Redis


async def sweep(api: Api) -> expiry.SweepResult:
    now = datetime.fromtimestamp(api.clock(), tz=UTC)
    return await expiry.sweep(
        api.cache, ActivityBuffer(api.cache.client), now=now, idle_timeout_s=IDLE,
        batch_size=100, idle_scope=api.settings.idle_scope,
    )  # fmt: skip


async def test_the_abandoned_device_is_refused_then_ended_the_used_one_stays(
    api_factory: ApiFactory,
) -> None:
    api = await api_factory(FakeClock(), idle_timeout_s=IDLE)
    assert api.settings.idle_scope == "session"
    # Given a user who used one device of two, and the flush moved that activity on
    await two_devices(api)
    await flush.flush_activity(ActivityBuffer(api.cache.client))

    # When the abandoned device calls past the timeout, before any sweep
    api.clock.advance(200)

    # Then it is refused as idle while the used one is granted (and a token without sid, of a
    # user with no implicit session, is measured by the user's newest request)
    assert await check(api, "phone") == (403, "idle_timeout")
    assert await check(api, "laptop") == (200, None)
    assert await check(api, None) == (200, None)

    # When the sweep runs
    result = await sweep(api)

    # Then the abandoned session ended and stays refused; the other one is still granted
    assert (result.sessions_ended, result.idle_users_disconnected) == (1, 0)
    assert await check(api, "phone") == (403, "session_ended")
    assert await check(api, "laptop") == (200, None)


async def test_the_user_scope_keeps_every_device_of_an_active_user(
    api_factory: ApiFactory,
) -> None:
    api = await api_factory(FakeClock(), idle_timeout_s=IDLE, idle_scope="user")
    # Given the same user
    await two_devices(api)
    await flush.flush_activity(ActivityBuffer(api.cache.client))
    api.clock.advance(200)

    # Then both devices are granted, and the sweep ends neither
    assert await check(api, "phone") == (200, None)
    result = await sweep(api)
    assert result.sessions_ended == 0
    assert await check(api, "phone") == (200, None)
    assert await check(api, "laptop") == (200, None)


async def test_activity_still_buffered_keeps_its_session(api_factory: ApiFactory) -> None:
    api = await api_factory(FakeClock(), idle_timeout_s=IDLE)
    # Given a user whose laptop request is only in Redis's buffer (never flushed)
    await two_devices(api)
    api.clock.advance(200)

    # Then the laptop is granted, the phone refused
    assert await check(api, "laptop") == (200, None)
    assert await check(api, "phone") == (403, "idle_timeout")

    # And a request a second ago still in this process's own buffer counts as well
    api.clock.advance(IDLE - 1)
    assert await check(api, "laptop") == (200, None)


async def test_the_row_is_asked_before_refusing(api_factory: ApiFactory) -> None:
    api = await api_factory(FakeClock(), idle_timeout_s=IDLE)
    # Given a session whose newest request only PostgreSQL has: the flush moved it there, and a
    # state change's older snapshot replaced the cache's patched one before the hash forgot it
    await api.event("connected", "u", session_id="s")
    api.clock.advance(IDLE + 100)
    pg = await asyncpg.connect(api.settings.database_url)
    try:
        recent = datetime.fromtimestamp(api.clock() - 5, tz=UTC)
        await pg.execute("UPDATE sessions SET last_seen_at = $1 WHERE user_id = 'u'", recent)
    finally:
        await pg.close()
    cached = await api.cache.get("u")
    assert cached is not None and cached.session_seen["s"] < recent

    # Then the session is granted
    assert await check(api, "s") == (200, None)
