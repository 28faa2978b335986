"""What the API answers around the periodic jobs: flushed activity keeps a user active past the
idle timeout counted from the connection, and an expired user's next request is refused."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from storage import expiry, flush
from storage.activity import ActivityBuffer
from storage.cache import user_key
from tests.api.conftest import Api, mint

pytestmark = pytest.mark.integration


async def test_flushed_activity_keeps_the_user_active_then_the_sweep_expires_them(
    api: Api,
) -> None:
    # Given a user connected almost an idle timeout ago who makes a request now
    idle = api.settings.idle_timeout_s
    await api.event("connected", "42", email="john@example.com")
    api.clock.advance(idle - 100)
    assert (await api.get("/auth/check", token=mint("42"))).status == 200
    await api.app.ctx.recorder.flush()
    last_request = api.clock()

    # When the flush moves that activity to PostgreSQL (and out of the pending buffer)
    result = await flush.flush_activity(ActivityBuffer(api.cache.client))
    assert result.users_updated == 1

    # Then, past the timeout counted from the connection, the user is still active
    api.clock.advance(200)
    assert (await api.get("/auth/check", token=mint("42"))).status == 200

    # When the user then goes silent beyond the timeout and the sweep runs
    await api.app.ctx.recorder.flush()
    await flush.flush_activity(ActivityBuffer(api.cache.client))
    now = datetime.fromtimestamp(api.clock() + idle + 1, tz=UTC)
    swept = await expiry.sweep(
        api.cache, ActivityBuffer(api.cache.client), now=now, idle_timeout_s=idle,
        batch_size=100,
    )  # fmt: skip
    api.clock.advance(idle + 1)

    # Then the user is expired, the key is gone and the next request is refused
    assert swept.users == ["42"] and last_request < now.timestamp()
    assert await api.cache.client.exists(user_key("42")) == 0
    reply = await api.get("/auth/check", token=mint("42"))
    assert (reply.status, reply.json()) == (403, {"error": "forbidden", "reason": "not_connected"})
