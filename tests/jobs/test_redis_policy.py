"""The start-up check of Redis ``maxmemory-policy``, against the real test server (its policy is
changed with CONFIG SET and restored)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from actors.runtime import Runtime
from sessiond.config import Settings
from storage import cache as cache_mod
from storage.redis_policy import UnsafeRedisPolicy, check_memory_policy

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
