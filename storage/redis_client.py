"""The one place Redis clients are built, for a single Redis or a Redis Cluster (CONTRACT §4, §10).

``SESSIOND_REDIS_URL`` names one server, or with ``SESSIOND_REDIS_CLUSTER=true`` the startup
nodes of a cluster: one or several comma-separated ``redis://host:port`` (or ``rediss://``)
URLs, or ``host:port`` items after the first URL (they take its scheme and credentials). The
client learns the whole cluster from whichever node answers first.

On a cluster a command goes to the master of its keys' slot; after a master dies, the client
retries (``CLUSTER_RETRIES``, with backoff) and reloads the slot map, so once a replica has taken
over the same calls reach it. What fails meanwhile raises one of ``UNAVAILABLE``, which callers
handle like a Redis that is down (the API decides from PostgreSQL, workers retry).

Also here, the few operations whose form differs between the two kinds: scripts on a pipeline,
reads of many users' keys, and SCAN (every master of a cluster).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Final, TypeVar, cast
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
import redis.cluster as sync_cluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from sessiond.config import Settings
from storage.keys import CLUSTER, SINGLE, KeyLayout, key_slot

AsyncRedis = aioredis.Redis | RedisCluster
SyncRedis = redis.Redis | sync_cluster.RedisCluster
AsyncPipeline = Pipeline | ClusterPipeline

UNAVAILABLE: Final = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterError,  # CLUSTERDOWN, MASTERDOWN: a failover under way
    TryAgainError,
    SlotNotCoveredError,
    OSError,
)
"""What a Redis call raises when the server (or a cluster's master) is down or unreachable."""

CLUSTER_RETRIES: Final = 6
"""Retries of a cluster command, backoff 0.1…1 s: long enough to ride out a slot map change,
short enough that a request falls back to PostgreSQL instead of hanging (a failover takes the
node timeout, ``cluster-node-timeout``, plus an election)."""

T = TypeVar("T")


def startup_nodes(url: str) -> list[tuple[str, int]]:
    """``(host, port)`` of every node ``SESSIOND_REDIS_URL`` lists (see the module docstring)."""
    nodes: list[tuple[str, int]] = []
    for item in (part.strip() for part in url.split(",")):
        if not item:
            continue
        parts = urlsplit(item if "://" in item else f"redis://{item}")
        nodes.append((parts.hostname or "127.0.0.1", parts.port or 6379))
    return nodes


def _options(settings: Settings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
    if settings.redis_url.startswith("rediss://") and settings.redis_ca_file:
        kwargs["ssl_ca_certs"] = settings.redis_ca_file
    return kwargs


def _first_url(settings: Settings) -> str:
    return settings.redis_url.split(",", 1)[0].strip()


def _retry() -> Retry:
    return Retry(ExponentialWithJitterBackoff(base=0.1, cap=1.0), CLUSTER_RETRIES)


def connect(settings: Settings) -> AsyncRedis:
    """A pooled asyncio client; ``rediss://`` verifies the server against
    ``SESSIOND_REDIS_CA_FILE``."""
    if not settings.redis_cluster:
        return aioredis.Redis.from_url(settings.redis_url, **_options(settings))
    nodes = [ClusterNode(h, p) for h, p in startup_nodes(settings.redis_url)]
    client = RedisCluster.from_url(_first_url(settings), **_options(settings), retry=_retry())
    client.nodes_manager.startup_nodes.update({n.name: n for n in nodes})
    return client


def connect_sync(settings: Settings) -> SyncRedis:
    """The blocking client (the scheduler's threads)."""
    if not settings.redis_cluster:
        return redis.Redis.from_url(settings.redis_url, **_options(settings))
    nodes = [
        sync_cluster.ClusterNode(h, p)  # type: ignore[no-untyped-call]
        for h, p in startup_nodes(settings.redis_url)
    ]
    return sync_cluster.RedisCluster(startup_nodes=nodes, retry=_retry(), **_options(settings))


def is_cluster(client: AsyncRedis | AsyncPipeline) -> bool:
    return isinstance(client, RedisCluster | ClusterPipeline)


def layout(client: AsyncRedis | AsyncPipeline) -> KeyLayout:
    """The key names for this client's kind of Redis (``storage.keys``)."""
    return CLUSTER if is_cluster(client) else SINGLE


async def run_script(
    script: AsyncScript, keys: Sequence[Any], args: Sequence[Any], pipe: AsyncPipeline
) -> None:
    """Queues ``script`` on a pipeline. A cluster pipeline refuses EVALSHA (it cannot load a
    missing script on the right node), so there the script's text goes with ``EVAL``; Redis
    caches it by its hash all the same."""
    if isinstance(pipe, ClusterPipeline):
        pipe.eval(cast(str, script.script), len(keys), *keys, *args)
    else:
        await script(keys=keys, args=args, client=pipe)


async def mget(client: AsyncRedis, keys: Sequence[str]) -> list[Any]:
    """``MGET`` of keys of any slots (on a cluster split per slot, answers in the keys' order)."""
    if isinstance(client, RedisCluster):
        return list(await client.mget_nonatomic(list(keys)))
    return list(await client.mget(list(keys)))


def by_slot(client: AsyncRedis, items: Iterable[T], key: Callable[[T], str]) -> list[list[T]]:
    """``items`` grouped so that each group's keys share a slot (one group on a single Redis),
    for scripts that take many users' keys at once."""
    everything = list(items)
    if not is_cluster(client):
        return [everything] if everything else []
    groups: dict[int, list[T]] = defaultdict(list)
    for item in everything:
        groups[key_slot(key(item))].append(item)
    return list(groups.values())


async def scan(client: AsyncRedis, pattern: str, count: int) -> AsyncIterator[list[str]]:
    """Pages of the keys matching ``pattern``: on a cluster, every master's keys."""
    if isinstance(client, RedisCluster):
        for node in client.get_primaries():
            cursor = 0
            while True:
                # A cluster answers ``({node name: cursor}, keys)``.
                reply = await client.scan(cursor, match=pattern, count=count, target_nodes=node)
                cursors, keys = cast(tuple[dict[str, int], list[Any]], reply)
                if keys:
                    yield [k.decode() if isinstance(k, bytes) else k for k in keys]
                cursor = int(cursors[node.name])
                if cursor == 0:
                    break
        return
    cursor = 0
    while True:
        cursor, keys = await client.scan(cursor, match=pattern, count=count)
        if keys:
            yield [k.decode() if isinstance(k, bytes) else k for k in keys]
        if int(cursor) == 0:
            return


async def run_each(
    client: AsyncRedis, script: AsyncScript, calls: Sequence[tuple[list[Any], list[Any]]]
) -> list[Any]:
    """Runs ``script`` once per ``(keys, args)``: one after the other on a single Redis (each
    call is already a batch), on one pipeline on a cluster (many small per-slot batches, one
    round trip per master)."""
    if not isinstance(client, RedisCluster):
        return [await script(keys=keys, args=args) for keys, args in calls]
    if not calls:
        return []
    async with client.pipeline(transaction=False) as pipe:
        for keys, args in calls:
            await run_script(script, keys, args, pipe)
        return list(await pipe.execute())


async def ping(client: AsyncRedis) -> bool:
    """Whether Redis answers; on a cluster, every master (a dead replica does not count: the
    data is served by the masters)."""
    if isinstance(client, RedisCluster):
        return bool(await client.ping(target_nodes=RedisCluster.PRIMARIES))
    return bool(await client.ping())
