"""The decision deadline (``SESSIOND_DECISION_DEADLINE_S``, ``api.decision``): a proxy asking
sessiond gets an answer within it, while Redis (``SIGSTOP`` of this stack's ``redis-server``)
or Redis and PostgreSQL both stop answering. Never a 200 that PostgreSQL would not give.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from sessiond.events import Event
from storage.state import apply_event
from tests.api.conftest import Api, ApiFactory, Reply, mint

pytestmark = pytest.mark.integration

DEADLINE_S = 0.5
BOUND_S = 1.8  # the deadline plus generous scheduling; the Redis socket timeout alone is 2 s


async def timed_check(api: Api, user_id: str) -> tuple[Reply, float]:
    started = time.monotonic()
    reply = await api.get("/auth/check", token=mint(user_id), timeout=20)
    return reply, time.monotonic() - started


async def cached_users(api: Api) -> None:
    """``live`` and ``gone`` connected and cached; then ``gone`` disconnected in PostgreSQL
    alone, so Redis still holds it as connected: only the fallback can refuse it."""
    for user_id in ("live", "gone"):
        await api.event("connected", user_id, email=f"{user_id}@example.com")
        assert (await timed_check(api, user_id))[0].status == 200
    await apply_event(Event(kind="disconnected", user_id="gone", occurred_at=datetime.now(UTC)))


async def test_paused_redis_answers_from_postgres_within_the_deadline(
    api_factory: ApiFactory, redis_pid: int
) -> None:
    # Given cached users, and an API with a short deadline
    api = await api_factory(decision_deadline_s=DEADLINE_S)
    await cached_users(api)

    # When Redis stops answering
    os.kill(redis_pid, signal.SIGSTOP)
    try:
        answers = [await timed_check(api, user) for user in ("live", "gone", "live", "gone")]
    finally:
        os.kill(redis_pid, signal.SIGCONT)

    # Then every answer came well before the Redis socket timeout, from PostgreSQL (or 503)
    elapsed = [round(seconds, 3) for _, seconds in answers]
    assert max(elapsed) < BOUND_S, elapsed
    statuses = [(user, reply.status) for user, (reply, _) in zip("lglg", answers, strict=True)]
    assert {s for u, s in statuses if u == "g"} <= {403, 503}, statuses
    assert {s for u, s in statuses if u == "l"} <= {200, 503}, statuses
    # And the slow Redis call counted as a Redis failure: bypassed, PostgreSQL decided
    assert api.app.ctx.access.redis_down
    assert [reply.status for reply, _ in answers] == [200, 403, 200, 403], statuses


async def test_nothing_answering_is_503_at_the_deadline(
    api_factory: ApiFactory, redis_pid: int, pause_postgres: Callable[[], None]
) -> None:
    # Given cached users, and an API with a short deadline
    api = await api_factory(decision_deadline_s=DEADLINE_S)
    await cached_users(api)
    errors = api.app.ctx.metrics.errors

    # When Redis and PostgreSQL both stop answering
    os.kill(redis_pid, signal.SIGSTOP)
    pause_postgres()
    answers = [await timed_check(api, user) for user in ("live", "gone", "live", "gone")]

    # Then each request is an outage answer within the bound, counted as a 503
    elapsed = [round(seconds, 3) for _, seconds in answers]
    assert max(elapsed) < BOUND_S, elapsed
    assert [reply.status for reply, _ in answers] == [503] * 4, [r.body for r, _ in answers]
    assert all(reply.json()["error"] == "unavailable" for reply, _ in answers)
    assert errors.get("503") == 4
