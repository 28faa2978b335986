"""The start-up check of Redis ``maxmemory-policy``, against the real test server (its policy is
changed with CONFIG SET and restored)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from actors.runtime import Runtime
from sessiond.config import Settings
from storage import cache as cache_mod
from storage.redis_policy import UnsafeRedisPolicy, check_memory_policy
from tests.conftest import Amqp, Process, async_wait_until, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
async def restore_policy(cache: cache_mod.Cache) -> AsyncIterator[cache_mod.Cache]:
    before = (await cache.client.config_get("maxmemory-policy"))["maxmemory-policy"]
    try:
        yield cache
    finally:
        await cache.client.config_set("maxmemory-policy", before or "noeviction")


async def test_noeviction_is_accepted(restore_policy: cache_mod.Cache) -> None:
    await restore_policy.client.config_set("maxmemory-policy", "noeviction")
    assert await check_memory_policy(restore_policy.client) == "noeviction"


@pytest.mark.parametrize(
    "policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-ttl"]
)
async def test_a_policy_that_can_evict_state_is_refused(
    restore_policy: cache_mod.Cache, policy: str
) -> None:
    # Given a server that may evict keys (volatile-*: the version keys carry TTLs)
    await restore_policy.client.config_set("maxmemory-policy", policy)
    # Then the check refuses it, naming the policy and the fix
    with pytest.raises(UnsafeRedisPolicy, match=f"'{policy}'.*noeviction"):
        await check_memory_policy(restore_policy.client)


async def test_a_worker_does_not_start_on_such_a_server_unless_told_to(
    db: Settings, restore_policy: cache_mod.Cache
) -> None:
    await restore_policy.client.config_set("maxmemory-policy", "allkeys-lru")
    runtime = Runtime(db)
    with pytest.raises(UnsafeRedisPolicy):
        await runtime.open()
    await runtime.close()
    # An operator who knows better can turn the check off
    unchecked = Runtime(db.model_copy(update={"redis_policy_check": False}))
    await unchecked.open()
    assert unchecked.cache is not None and await unchecked.cache.ping()
    await unchecked.close()


async def test_a_refused_worker_process_exits_and_takes_no_event(
    migrated: Settings,
    restore_policy: cache_mod.Cache,
    broker_client: Amqp,
    pg: asyncpg.Connection,
    spawn: Callable[..., Process],
) -> None:
    # Given a login waiting in the queue, and a Redis that may evict sessiond's state
    broker_client.publish({"event": "connected", "user_id": "u-policy"})
    await restore_policy.client.config_set("maxmemory-policy", "allkeys-lru")
    # When a worker starts on it
    refused = spawn("worker", "--processes", "1", "--threads", "2")
    # Then it stops by itself, non-zero, saying why, before it consumed anything
    wait_until(lambda: not refused.alive(), timeout=60)
    assert refused.stop() != 0
    assert "'allkeys-lru'" in refused.output()
    assert await pg.fetchval("SELECT count(*) FROM processed_events") == 0
    # And once Redis is fixed, the next worker applies the login: nothing was dead-lettered
    await restore_policy.client.config_set("maxmemory-policy", "noeviction")
    spawn("worker", "--processes", "1", "--threads", "2")
    await async_wait_until(
        lambda: pg.fetchval("SELECT status = 'connected' FROM users WHERE id = 'u-policy'"),
        timeout=60,
    )
