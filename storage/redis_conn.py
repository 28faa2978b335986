"""The one place that builds Redis clients, for the asyncio processes (API, workers' jobs) and the
threaded scheduler alike, for a single Redis or a Redis Cluster (CONTRACT §4, §10), so a change
of deployment (TLS, timeouts, a cluster) is made once.

Both clients share one set of options: a 2 s socket and connect timeout (a Redis that stops
answering must fail a request or a tick, not hang it) and, for ``rediss://`` URLs, the CA file
``SESSIOND_REDIS_CA_FILE`` to verify the server against.

``SESSIOND_REDIS_URL`` names one server, or with ``SESSIOND_REDIS_CLUSTER=true`` the startup
nodes of a cluster: one or several comma-separated ``redis://host:port`` (or ``rediss://``)
URLs, or ``host:port`` items after the first URL. The client learns the whole cluster from
whichever node answers first. On a cluster a command goes to the master of its keys' slot; after
a master dies, the client retries (``CLUSTER_RETRIES``, with backoff) and reloads the slot map,
so once a replica has taken over the same calls reach it. What fails meanwhile raises one of
``REDIS_CONNECTION_ERRORS``, handled like a Redis that is down (the API decides from PostgreSQL,
workers retry).

Also here, the few operations whose form differs between the two kinds: scripts on a pipeline,
reads of many users' keys, SCAN (every master of a cluster) and PING (every master).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Final, TypeAlias, TypeVar, cast
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
import redis.cluster as sync_cluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ClusterError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from sessiond.config import Settings
from storage.keys import CLUSTER, SINGLE, KeyLayout, key_slot

AsyncClient: TypeAlias = aioredis.Redis | RedisCluster
SyncClient: TypeAlias = redis.Redis | sync_cluster.RedisCluster
"""What ``connect`` and ``connect_sync`` return: callers outside ``storage`` name these, never the
driver's classes."""
AsyncPipeline: TypeAlias = Pipeline | ClusterPipeline

REDIS_CONNECTION_ERRORS: Final = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterError,  # CLUSTERDOWN, MASTERDOWN: a cluster's failover under way
    TryAgainError,
    SlotNotCoveredError,
)
"""What Redis calls raise when the server (a cluster's master) is down, restarting, failing over
or too slow: the one list the API's outage handling (bypass Redis, 503, gRPC UNAVAILABLE) is
built from, as ``storage.db.DB_CONNECTION_ERRORS`` is for PostgreSQL."""

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


def _options(settings: Settings, decode_responses: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "socket_timeout": 2.0,
        "socket_connect_timeout": 2.0,
        "decode_responses": decode_responses,
    }
    if settings.redis_url.startswith("rediss://") and settings.redis_ca_file:
        kwargs["ssl_ca_certs"] = settings.redis_ca_file
    return kwargs


class _Connection(aioredis.Connection):
    """redis-py's asyncio connection, with a closed transport reported as what it is. Under
    uvloop, a command written to a connection whose transport another task has just closed (a
    cluster master SIGKILLed or failed over: the client drops that node's connections while other
    requests still hold them) raises ``RuntimeError('unable to perform operation on
    <TCPTransport closed=True ...>')``, or ``AttributeError`` on the writer the disconnect cleared,
    instead of ``ConnectionError``. The cluster client retries, and the API falls back to
    PostgreSQL, only on ``ConnectionError``: without this the model checker on the cluster saw
    79 answers 500 within a second of a master's death."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except RuntimeError as exc:
            if "unable to perform operation on" not in str(exc):
                raise
            raise RedisConnectionError(f"connection closed under a command: {exc}") from exc
        except AttributeError as exc:
            if exc.obj is not None or exc.name not in ("writelines", "write", "drain"):
                raise
            raise RedisConnectionError(f"connection closed under a command: {exc}") from exc


class _SSLConnection(_Connection, aioredis.SSLConnection):
    """The same, for ``rediss://``."""


def _connection_class(settings: Settings) -> type[aioredis.Connection]:
    return _SSLConnection if settings.redis_url.startswith("rediss://") else _Connection


def _retry() -> Retry:
    return Retry(ExponentialWithJitterBackoff(base=0.1, cap=1.0), CLUSTER_RETRIES)


def connect(settings: Settings, *, decode_responses: bool = False) -> AsyncClient:
    """A pooled asyncio client; ``decode_responses`` answers ``str`` instead of ``bytes``."""
    options = _options(settings, decode_responses)
    connection_class = _connection_class(settings)
    if not settings.redis_cluster:
        return aioredis.Redis.from_url(
            settings.redis_url, **options, connection_class=connection_class
        )
    first = settings.redis_url.split(",", 1)[0].strip()
    client = RedisCluster.from_url(first, **options, retry=_retry())
    # RedisCluster picks its connection class itself; every node the client learns later is
    # built from this same dict (its NodesManager shares it).
    client.connection_kwargs["connection_class"] = connection_class
    nodes = [ClusterNode(h, p) for h, p in startup_nodes(settings.redis_url)]
    client.nodes_manager.startup_nodes.update({n.name: n for n in nodes})
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_class = connection_class
    return client


def connect_sync(settings: Settings, *, decode_responses: bool = False) -> SyncClient:
    """A pooled blocking client, for the scheduler's threads."""
    options = _options(settings, decode_responses)
    if not settings.redis_cluster:
        return redis.Redis.from_url(settings.redis_url, **options)
    nodes = [
        sync_cluster.ClusterNode(h, p)  # type: ignore[no-untyped-call]
        for h, p in startup_nodes(settings.redis_url)
    ]
    return sync_cluster.RedisCluster(startup_nodes=nodes, retry=_retry(), **options)


def is_cluster(client: AsyncClient | AsyncPipeline) -> bool:
    return isinstance(client, RedisCluster | ClusterPipeline)


def layout(client: AsyncClient | AsyncPipeline) -> KeyLayout:
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


async def mget(client: AsyncClient, keys: Sequence[str]) -> list[Any]:
    """``MGET`` of keys of any slots (on a cluster split per slot, answers in the keys' order)."""
    if isinstance(client, RedisCluster):
        return list(await client.mget_nonatomic(list(keys)))
    return list(await client.mget(list(keys)))


def by_slot(client: AsyncClient, items: Iterable[T], key: Callable[[T], str]) -> list[list[T]]:
    """``items`` grouped so that each group's keys share a slot (one group on a single Redis),
    for scripts that take many users' keys at once."""
    everything = list(items)
    if not is_cluster(client):
        return [everything] if everything else []
    groups: dict[int, list[T]] = defaultdict(list)
    for item in everything:
        groups[key_slot(key(item))].append(item)
    return list(groups.values())


async def scan(client: AsyncClient, pattern: str, count: int) -> AsyncIterator[list[str]]:
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
    client: AsyncClient, script: AsyncScript, calls: Sequence[tuple[list[Any], list[Any]]]
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


async def ping(client: AsyncClient) -> bool:
    """Whether Redis answers; on a cluster, every master (a dead replica does not count: the
    data is served by the masters)."""
    if isinstance(client, RedisCluster):
        return bool(await client.ping(target_nodes=RedisCluster.PRIMARIES))
    return bool(await client.ping())
