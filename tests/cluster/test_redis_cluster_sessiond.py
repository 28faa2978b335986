"""sessiond on a Redis Cluster (CONTRACT §10): the API and the pipeline, buffers sharded over
the masters, and a master SIGKILLed: no wrong 200 during the failover, logins after it.

PostgreSQL and RabbitMQ are the single-node stack's; only Redis is the cluster.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio.cluster import RedisCluster

from sessiond.config import Settings
from sessiond.stack import redis_cluster
from sessiond.stack.cluster_config import ClusterConfig
from storage import cache as cache_mod
from storage import flush, redis_conn
from storage.activity import AccessLog, ActivityBuffer
from storage.keys import CLUSTER, key_slot
from tests.api.conftest import Api, mint, start_api, stop_api
from tests.conftest import Amqp, Process, async_wait_until, truncate

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

REVOCATION_BOUND_S = 7.0  # docs/reliability.md: reconcile period + socket timeout + commit


@pytest.fixture
async def cluster_settings(
    migrated: Settings, redis_cluster_nodes: list[tuple[str, int]]
) -> AsyncIterator[Settings]:
    """The test settings with Redis on the cluster, emptied (every master), tables emptied."""
    url = ",".join(f"redis://{h}:{p}" for h, p in redis_cluster_nodes)
    settings = migrated.model_copy(update={"redis_cluster": True, "redis_url": url})
    await truncate(settings)
    client = redis_conn.connect(settings)
    assert isinstance(client, RedisCluster)
    await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    await client.aclose()
    yield settings


@pytest.fixture
async def cluster_api(cluster_settings: Settings) -> AsyncIterator[Api]:
    cache = cache_mod.Cache(
        redis_conn.connect(cluster_settings), ttl_s=cluster_settings.cache_ttl_s
    )
    api = await start_api(cluster_settings, cache)
    try:
        yield api
    finally:
        # Bounded: a stop that hangs fails the test with every task's stack, not after the
        # suite's timeout with none (seen once in several runs, not understood yet).
        for step in (stop_api(api), cache.close()):
            try:
                await asyncio.wait_for(step, 30)
            except TimeoutError:
                for task in asyncio.all_tasks():
                    task.print_stack(file=sys.stderr)
                raise


def env_of(settings: Settings) -> dict[str, str]:
    return {"SESSIOND_REDIS_CLUSTER": "true", "SESSIOND_REDIS_URL": settings.redis_url}


def owner(client: RedisCluster, key: str) -> str:
    """``host:port`` of the master holding ``key``."""
    node = client.get_node_from_key(key)
    assert node is not None
    return str(node.name)


async def status(api: Api, user_id: str) -> int:
    return (await api.get("/auth/check", token=mint(user_id), timeout=15)).status


async def test_login_and_logout_through_the_pipeline(
    cluster_api: Api,
    cluster_settings: Settings,
    broker_client: Amqp,
    spawn: Callable[..., Process],
) -> None:
    # Given a worker on the cluster
    worker = spawn("worker", "--processes", "1", "--threads", "2", env=env_of(cluster_settings))
    # When users log in the way the auth service publishes it
    users = [f"c{i}" for i in range(20)]
    for uid in users:
        broker_client.publish({"event": "connected", "user_id": uid, "email": f"{uid}@x"})

    async def all_granted() -> bool:
        return all([await status(cluster_api, uid) == 200 for uid in users])

    # Then each is granted, its keys spread over the cluster, each user's in one slot
    await async_wait_until(all_granted, timeout=60)
    client = cluster_api.cache.client
    assert isinstance(client, RedisCluster)
    assert await client.get(CLUSTER.version("c0")) is not None
    nodes = {owner(client, f"user:{uid}") for uid in users}
    assert len(nodes) >= 2
    # When they log out, they are refused (from the gone mark, without PostgreSQL)
    for uid in users:
        broker_client.publish({"event": "disconnected", "user_id": uid})

    async def all_refused() -> bool:
        return all([await status(cluster_api, uid) == 403 for uid in users])

    await async_wait_until(all_refused, timeout=60)
    assert await client.exists(CLUSTER.gone("c0")) == 1
    assert worker.alive(), worker.output()[-3000:]


async def test_buffers_are_spread_over_the_masters(cluster_api: Api) -> None:
    # Given granted requests of many users, pushed by the API's recorder
    for i in range(40):
        await cluster_api.event("connected", f"b{i}")
    for i in range(40):
        assert await status(cluster_api, f"b{i}") == 200
    await cluster_api.app.ctx.recorder.flush()
    client = cluster_api.cache.client
    assert isinstance(client, RedisCluster)
    # Then the activity shards holding entries live on at least two masters
    buffer = ActivityBuffer(client)
    filled = [k for k in buffer.keys if await client.hlen(k)]
    assert len({owner(client, k) for k in filled}) >= 2
    assert sum([await client.hlen(k) for k in filled]) == 40
    # and the access log's pushes go to the shards in turn
    log = AccessLog(client)
    for _ in range(len(log.shards)):
        await log.append(['{"decision":"granted"}'])
    owners = {owner(client, s.entries) for s in log.shards}
    assert len(owners) == 3
    assert all([await client.llen(s.entries) >= 1 for s in log.shards])
    # When the flush runs on the cluster, it drains every shard into PostgreSQL
    result = await flush.flush_activity(buffer, access_log=log)
    assert (result.activity_entries, result.users_updated, result.skipped) == (40, 40, False)
    assert result.access_entries == 40 + len(log.shards) and result.access_backlog == 0
    assert not any([await client.hlen(k) for k in buffer.keys])


async def test_a_master_killed_gives_no_wrong_200_and_logins_work_after(
    cluster_api: Api, cluster_config: ClusterConfig
) -> None:
    api = cluster_api
    client = api.cache.client
    assert isinstance(client, RedisCluster)
    # Given connected users and logged-out users on every master
    connected = [f"k{i}" for i in range(30)]
    logged_out = [f"o{i}" for i in range(30)]
    for uid in connected + logged_out:
        await api.event("connected", uid)
    for uid in logged_out:
        await api.event("disconnected", uid)
    for uid in connected:
        assert await status(api, uid) == 200
    for uid in logged_out:
        assert await status(api, uid) == 403
    # When the master of one of the connected users is SIGKILLed
    victim_port = int(owner(client, f"user:{connected[0]}").rsplit(":", 1)[1])
    pid = redis_cluster.node_pid(cluster_config, victim_port)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        # and some connected users log out while it is down (their evictions may be lost)
        revoked: dict[str, float] = {}
        for uid in connected[:10]:
            try:
                await api.event("disconnected", uid)
            except Exception as exc:  # the commit happened; the Redis write may fail after
                assert "postgres" not in repr(exc).lower()
            revoked[uid] = time.monotonic()
        # Then during the failover, no logged-out user is ever granted (past the bound for
        # those revoked meanwhile), and the others get 200 or 503, never anything else
        answers: dict[int, int] = {}
        wrong: list[tuple[str, int, float]] = []
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            for uid in logged_out + connected:
                code = await status(api, uid)
                answers[code] = answers.get(code, 0) + 1
                now = time.monotonic()
                gone = uid in logged_out or (
                    uid in revoked and now - revoked[uid] > REVOCATION_BOUND_S
                )
                if code == 200 and gone:
                    wrong.append((uid, code, now - killed_at))
                assert code in (200, 403, 503), (uid, code)
            await asyncio.sleep(0.2)
        assert not wrong, wrong
        # and logins work again once a replica took over
        redis_cluster.wait_ok(cluster_config, timeout=30)
        await api.event("connected", "after")

        async def granted() -> bool:
            return await status(api, "after") == 200

        await async_wait_until(granted, timeout=30)
        for uid in connected[10:]:
            assert await status(api, uid) == 200
        for uid in connected[:10] + logged_out:
            assert await status(api, uid) == 403
        assert victim_port not in {int(n.port) for n in client.get_primaries()}
        assert key_slot(f"user:{connected[0]}") >= 0
        print({"answers": answers, "killed_port": victim_port})
    finally:
        # The killed node comes back as a replica, once its replica took over (docs/cluster.md:
        # restarted earlier, the empty node would be copied by its replica).
        redis_cluster.wait_ok(cluster_config, timeout=60)
        redis_cluster.up(cluster_config)
