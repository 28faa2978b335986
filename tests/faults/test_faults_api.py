"""The API with a dependency down: Redis down → decisions from PostgreSQL (slower, correct);
PostgreSQL down → cache hits still answer, a miss is 503; both down → 503; never a wrong 200, and
it recovers by itself when the servers come back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sanic import Sanic

from sessiond import stack
from sessiond.config import Settings
from sessiond.events import Event
from storage import cache as cache_mod
from storage import redis_conn
from storage.state import apply_event, publish_snapshot
from tests.api.conftest import Api, FakeClock, mint, start_api, stop_api
from tests.faults._support import Figure

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
async def api(clean: Settings, servers_back: stack.StackConfig) -> AsyncIterator[Api]:
    """An in-process API on the emptied stack; its own Redis client, closed even if Redis died."""
    cache = cache_mod.Cache(redis_conn.connect(clean), ttl_s=clean.cache_ttl_s)
    served = await start_api(clean, cache, FakeClock())
    try:
        yield served
    finally:
        await stop_api(served)
        await cache.close()
        if Sanic._app_registry.get(served.app.name) is not None:
            Sanic.unregister_app(served.app)


async def event(api: Api, kind: str, user_id: str, *, sync: bool = True, **fields: Any) -> None:
    """Applies an event as a partition worker would; ``sync=False`` when Redis is down."""
    fields.setdefault("occurred_at", datetime.now(UTC))
    outcome = await apply_event(Event(kind=kind, user_id=user_id, **fields))  # type: ignore[arg-type]
    if sync:
        await publish_snapshot(api.cache, outcome)


async def status(api: Api, user: str, **kwargs: Any) -> tuple[int, str]:
    reply = await api.get("/auth/check", token=mint(user, **kwargs))
    body = reply.json() if reply.body else {}
    return reply.status, str(body.get("reason") or body.get("error") or "")


async def timed(api: Api, user: str, **kwargs: Any) -> tuple[int, str, float]:
    started = time.perf_counter()
    code, reason = await status(api, user, **kwargs)
    return code, reason, time.perf_counter() - started


async def eventually(api: Api, user: str, expected: int, timeout: float = 20.0) -> float:
    started = time.monotonic()
    while (await status(api, user))[0] != expected:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{user} never answered {expected}")
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def test_redis_down_decides_from_postgres(api: Api, servers_back: stack.StackConfig) -> None:
    # Given a connected user (two sessions), a disconnected one, and an idle one
    await event(api, "connected", "ok", session_id="phone")
    await event(api, "connected", "ok", session_id="laptop")
    await event(api, "disconnected", "ok", session_id="laptop")
    await event(api, "connected", "gone")
    await event(api, "disconnected", "gone")
    idle_since = datetime.now(UTC) - timedelta(hours=2)
    await event(api, "connected", "idle", occurred_at=idle_since)
    assert (await status(api, "ok"))[0] == 200
    # When Redis stops
    stack.stop(servers_back, "redis")
    try:
        # Then PostgreSQL decides, exactly as the cache would have
        first = await timed(api, "ok", sid="phone")
        assert first[:2] == (200, "")
        assert await status(api, "ok", sid="laptop") == (403, "session_ended")
        assert await status(api, "gone") == (403, "not_connected")
        assert await status(api, "nobody") == (403, "not_connected")
        # An idle-looking user's pending activity lives in Redis only: 503, never a guess
        assert await status(api, "idle") == (503, "unavailable")
        # A disconnection committed while Redis is down is honoured at once
        await event(api, "disconnected", "ok", session_id="phone", sync=False)
        assert await status(api, "ok") == (403, "not_connected")
        await event(api, "connected", "ok", session_id="tablet", sync=False)
        # And later requests bypass Redis instead of each waiting for it
        latencies = [(await timed(api, "ok", sid="tablet"))[2] for _ in range(20)]
        assert api.app.ctx.access.redis_down
        readiness = await api.get("/health/ready")
        assert readiness.status == 503 and readiness.json()["down"] == ["redis"]
    finally:
        stack.start(servers_back, "redis")
    recovered = time.monotonic()
    # Then the cache is used again, by itself
    deadline = time.monotonic() + 10
    while api.app.ctx.access.redis_down and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not api.app.ctx.access.redis_down
    assert await status(api, "ok", sid="tablet") == (200, "")
    hits = api.app.ctx.metrics.cache.get("hit")
    assert await status(api, "ok", sid="tablet") == (200, "")
    assert api.app.ctx.metrics.cache.get("hit") == hits + 1
    p50 = sorted(latencies)[len(latencies) // 2]
    Figure(
        fault="API: Redis down",
        sent=None, applied=None, lost=0, duplicated=0,
        recovery_s=round(time.monotonic() - recovered, 1),
        note=f"decisions from PostgreSQL; first {first[2] * 1000:.0f} ms, then p50 "
        f"{p50 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms",
    ).save()  # fmt: skip
    assert max(latencies) < 1.0


async def test_postgres_down_cache_hit_answers_miss_is_503(
    api: Api, servers_back: stack.StackConfig
) -> None:
    await event(api, "connected", "cached")
    await event(api, "connected", "uncached")
    await event(api, "connected", "gone")
    await event(api, "disconnected", "gone")
    await api.cache.client.delete("user:uncached")
    # When PostgreSQL stops
    stack.stop(servers_back, "postgres")
    try:
        # Then a cache hit still answers (Redis holds the projection), a miss cannot: 503
        assert await status(api, "cached") == (200, "")
        assert await status(api, "uncached") == (503, "unavailable")
        # A logged-out user is refused from Redis's gone mark, without PostgreSQL
        assert await status(api, "gone") == (403, "not_connected")
        assert await status(api, "nobody") == (503, "unavailable")
        me = await api.get("/api/me", token=mint("uncached"))
        assert me.status == 503
        readiness = await api.get("/health/ready")
        assert readiness.status == 503 and readiness.json()["down"] == ["postgres"]
        # Admin routes read PostgreSQL only: 503 too, never a 500
        admin = await api.get("/admin/users/cached", token=mint("root", roles=["admin"]))
        assert (admin.status, admin.json()["error"]) == (503, "unavailable")
    finally:
        stack.start(servers_back, "postgres")
    # Then it recovers by itself (the pool reconnects)
    recovery = await eventually(api, "uncached", 200)
    assert await status(api, "gone") == (403, "not_connected")
    Figure(
        fault="API: PostgreSQL down",
        sent=None, applied=None, lost=0, duplicated=0, recovery_s=round(recovery, 1),
        note="cache hits answered; misses 503; no wrong 200",
    ).save()  # fmt: skip


async def test_both_down_is_503_then_recovers(api: Api, servers_back: stack.StackConfig) -> None:
    await event(api, "connected", "u")
    assert (await status(api, "u"))[0] == 200
    stack.stop(servers_back, "redis")
    stack.stop(servers_back, "postgres")
    try:
        assert await status(api, "u") == (503, "unavailable")
        assert await status(api, "nobody") == (503, "unavailable")
        readiness = await api.get("/health/ready")
        assert readiness.status == 503
        assert sorted(readiness.json()["down"]) == ["postgres", "redis"]
        # A bad token is still a 401: no dependency is needed to refuse it
        assert (await api.get("/auth/check", token="not.a.jwt")).status == 401
    finally:
        stack.start(servers_back, "postgres")
        stack.start(servers_back, "redis")
    recovery = await eventually(api, "u", 200)
    assert (await api.get("/health/ready")).status == 200
    Figure(
        fault="API: Redis and PostgreSQL down",
        sent=None, applied=None, lost=0, duplicated=0, recovery_s=round(recovery, 1),
        note="503 throughout; 401 for bad tokens",
    ).save()  # fmt: skip
