"""The gone mark: a user whose logout Redis saw is refused from Redis alone, so clients that keep
calling with a logged-out token cost no database query; a newer login clears the mark."""

from __future__ import annotations

import asyncpg
import pytest

from storage.cache import gone_key, user_key
from tests.api.conftest import Api, ApiFactory, mint
from tests.api.test_api_access import assert_forbidden
from tests.api.test_api_reconcile import lost_write, turn

pytestmark = pytest.mark.integration


@pytest.fixture
async def api(api_factory: ApiFactory) -> Api:
    return await api_factory(cache_reconcile_s=0)  # turns are taken by the tests


def gone_hits(api: Api) -> float:
    return api.app.ctx.metrics.cache.get("gone")


async def test_a_logged_out_user_is_refused_from_redis_alone(
    api: Api, orm_pg: asyncpg.Connection
) -> None:
    # Given a user who logged out
    await api.event("connected", "42")
    await api.event("disconnected", "42")
    assert await api.cache.client.exists(user_key("42"), gone_key("42")) == 1  # the mark only

    # When PostgreSQL is made to say "connected" behind Redis's back
    await orm_pg.execute("UPDATE users SET status = 'connected' WHERE id = '42'")

    # Then the token is still refused: the mark answered, the database was not asked
    for _ in range(3):
        assert_forbidden(await api.get("/auth/check", token=mint("42")), "not_connected")
    assert gone_hits(api) == 3


async def test_a_new_login_clears_the_mark(api: Api) -> None:
    # Given a user who logged out, then in again
    await api.event("connected", "42")
    await api.event("disconnected", "42")
    await api.event("connected", "42")
    # Then the mark is gone and the user passes
    assert await api.cache.client.exists(gone_key("42")) == 0
    assert (await api.get("/auth/check", token=mint("42"))).status == 200


async def test_a_login_whose_write_was_lost_passes_after_one_reconciler_turn(api: Api) -> None:
    # Given a user who logged out, then in again, the login's Redis write lost
    await api.event("connected", "42")
    await api.event("disconnected", "42")
    await lost_write("connected", "42")
    # Meanwhile the stale mark refuses them: fail closed, never a wrong 200
    assert_forbidden(await api.get("/auth/check", token=mint("42")), "not_connected")

    # When the reconciler takes its turn, the mark goes and the user passes from PostgreSQL
    assert await turn(api) == 1
    assert await api.cache.client.exists(gone_key("42")) == 0
    assert (await api.get("/auth/check", token=mint("42"))).status == 200


async def test_a_refill_from_postgres_marks_a_disconnected_user(api: Api) -> None:
    # Given a logged-out user whose Redis keys were lost (a Redis restart)
    await api.event("connected", "42")
    await api.event("disconnected", "42")
    await api.cache.client.flushdb()
    # When their token comes once, PostgreSQL decides and the refill leaves the mark
    assert_forbidden(await api.get("/auth/check", token=mint("42")), "not_connected")
    assert await api.cache.client.exists(gone_key("42")) == 1
    # Then the next one is refused from Redis
    assert_forbidden(await api.get("/auth/check", token=mint("42")), "not_connected")
    assert gone_hits(api) == 1
