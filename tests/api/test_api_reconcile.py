"""The cache reconciler: when a worker committed a change but its Redis write was lost, the API
stops granting on the stale entry within one reconciler period, and leaves current entries be."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from api.reconciler import Reconciler
from sessiond.events import Event
from storage.cache import user_key
from storage.reconcile import LOCK_KEY
from storage.state import apply_event
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
