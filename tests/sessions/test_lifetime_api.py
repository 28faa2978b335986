"""The absolute lifetime at request time (``SESSIOND_SESSION_MAX_S``), with the API's injectable
clock: a session older than that is refused before the sweep has ended it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.api.conftest import ApiFactory, FakeClock, mint

pytestmark = pytest.mark.integration

HOUR = 3600
DAY = 24 * HOUR


async def test_session_past_its_lifetime_is_refused(api_factory: ApiFactory) -> None:
    clock = FakeClock()
    api = await api_factory(clock, session_max_s=HOUR, idle_timeout_s=DAY)
    now = datetime.now(UTC)
    # Given a user with a 2-hour-old session and a 10-minute-old one
    await api.event("connected", "u1", session_id="old", occurred_at=now - timedelta(hours=2))
    await api.event("connected", "u1", session_id="new", occurred_at=now - timedelta(minutes=10))
    # Then the old session's token is refused, the young one's granted
    old = await api.get("/auth/check", token=mint("u1", sid="old"))
    assert (old.status, old.json()) == (403, {"error": "forbidden", "reason": "max_lifetime"})
    assert (await api.get("/auth/check", token=mint("u1", sid="new"))).status == 200
    # And a token without sid passes while one session is young enough
    assert (await api.get("/api/me", token=mint("u1"))).status == 200

    # When the clock moves past the young session's lifetime too
    clock.advance(HOUR)
    # Then every token of the user is refused
    for token in (mint("u1", sid="new"), mint("u1")):
        reply = await api.get("/auth/check", token=token)
        assert (reply.status, reply.json()["reason"]) == (403, "max_lifetime")


async def test_no_lifetime_by_default(api_factory: ApiFactory) -> None:
    api = await api_factory(FakeClock(), idle_timeout_s=60 * DAY)
    assert api.settings.session_max_s is None
    ten_days_ago = datetime.now(UTC) - timedelta(days=10)
    await api.event("connected", "u1", session_id="s", occurred_at=ten_days_ago)
    assert (await api.get("/auth/check", token=mint("u1", sid="s"))).status == 200
