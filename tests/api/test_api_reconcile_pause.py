"""Issue 11, scenario 2: a cache that comes back stale is not believed.

Redis is paused (``SIGSTOP`` of this stack's ``redis-server``, its data kept) for longer than the
reconciler's old fixed window, an admin disconnect commits meanwhile (its eviction cannot reach
Redis), then Redis resumes holding the user's stale entry. The user's token must be refused
throughout: from PostgreSQL while Redis is away, and after it resumes because the API catches up
before it trusts that Redis again (docs/reliability.md, "Revocation bound").
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessiond import stack
from storage.cache import user_key
from tests.api.conftest import Api, ApiFactory, Reply, mint

pytestmark = pytest.mark.integration

PAUSE_S = 16.0  # the reproduction; the old reconciler looked 10 s back
ADMIN = mint("root", roles=["admin"], ttl=86_400)  # minted at collection: outlives the suite


@pytest.fixture
def redis_pid(stack_config: stack.StackConfig) -> Iterator[int]:
    """This stack's redis-server (from its pidfile, checked to be the one on our port); it is
    resumed whatever the test does."""
    pid = int(Path(stack_config.pidfile("redis")).read_text().strip())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert "redis-server" in cmdline and f":{stack_config.redis_port}" in cmdline, cmdline
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


async def check(api: Api, user_id: str) -> Reply:
    return await api.get("/auth/check", token=mint(user_id), timeout=15)


async def test_a_stale_cache_after_a_pause_is_not_believed(
    api_factory: ApiFactory, redis_pid: int
) -> None:
    # Given a connected, cached user, an API reconciling every second
    api = await api_factory(cache_reconcile_s=1.0)
    await api.event("connected", "p2", name="Paused", email="p2@example.com")
    assert (await check(api, "p2")).status == 200
    assert await api.cache.client.exists(user_key("p2")) == 1

    # When Redis is paused for longer than the old window, and an admin disconnects the user
    os.kill(redis_pid, signal.SIGSTOP)
    paused_at = time.monotonic()
    answers: list[int] = []
    try:
        reply = await api.post("/admin/users/p2/disconnect", token=ADMIN, timeout=15)
        assert reply.status == 200, reply.body  # committed; the eviction goes to the reconciler
        assert reply.json()["status"] == "disconnected"
        while time.monotonic() - paused_at < PAUSE_S:
            answers.append((await check(api, "p2")).status)
            await asyncio.sleep(0.5)
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    resumed_at = time.monotonic()

    # Then while Redis was away the user was refused (PostgreSQL decided), and Redis kept the
    # stale entry the admin route could not evict
    assert answers and set(answers) == {403}, answers
    # And after Redis is back, every answer is a refusal, never a 200 from the stale entry
    after: list[int] = []
    while time.monotonic() - resumed_at < 8.0:
        after.append((await check(api, "p2")).status)
        await asyncio.sleep(0.1)
    assert set(after) == {403}, after
    # And the API caught up: the entry is gone and the cache is in use again
    assert not api.app.ctx.access.redis_down
    assert await api.cache.client.exists(user_key("p2")) == 0
    assert api.app.ctx.metrics.reconciled.get() >= 1
