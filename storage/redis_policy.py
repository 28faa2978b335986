"""Refuses a Redis whose ``maxmemory-policy`` could evict sessiond's own state.

Redis holds more than a cache for sessiond: the ``activity`` hash (requests not yet in
PostgreSQL), the ``audit:access`` list and its counts (decisions not yet journaled), and the
``ver:<id>`` keys that stop an older snapshot from overwriting a newer one. Evicting any of them
is not a cache miss: lost activity can expire an active user, a lost decision breaks the journal,
and a lost version key lets a late writer put a disconnected user back as connected.
- ``allkeys-*`` may evict any key, the hash and the list included: refused.
- ``volatile-*`` evicts only keys with a TTL, but the version keys carry one (twice the cache
  TTL, so they outlive the snapshots they guard): refused too.
- ``noeviction`` is the one policy that fits: at ``maxmemory`` writes fail with an error, which
  sessiond handles like Redis being down (the API decides from PostgreSQL and keeps its capped
  buffer; workers retry), and nothing is silently dropped.
"""

from __future__ import annotations

import logging
from typing import Final

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sessiond.errors import SessiondError
from storage.redis_conn import AsyncClient

log = logging.getLogger(__name__)

REQUIRED_POLICY: Final = "noeviction"


class UnsafeRedisPolicy(SessiondError):
    """The Redis server may evict keys that hold sessiond's state (see the module docstring)."""


async def check_memory_policy(client: AsyncClient) -> str | None:
    """The server's policy when it may be read (``None``: CONFIG is not allowed, e.g. a managed
    Redis that renames it; then the operator's word stands, with a warning). Raises
    ``UnsafeRedisPolicy`` for any policy but ``noeviction``; on a cluster, of any master."""
    if isinstance(client, RedisCluster):
        policies = {await _policy(client, node) for node in client.get_primaries()}
        known = {p for p in policies if p is not None}
        for policy in sorted(known - {REQUIRED_POLICY}):
            _refuse(policy)
        return REQUIRED_POLICY if known and None not in policies else None
    return await _policy(client, None)


async def _policy(client: AsyncClient, node: ClusterNode | None) -> str | None:
    try:
        if isinstance(client, RedisCluster):
            reply = await client.config_get("maxmemory-policy", target_nodes=node)
        else:
            reply = await client.config_get("maxmemory-policy")
    except ResponseError as exc:
        log.warning(
            "cannot read redis maxmemory-policy; make sure it is noeviction",
            extra={"error": str(exc)[:200]},
        )
        return None
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        log.warning(  # Redis down at start-up: sessiond runs degraded; the next start checks
            "redis unreachable; maxmemory-policy not checked", extra={"error": str(exc)[:200]}
        )
        return None
    raw = reply.get("maxmemory-policy") or reply.get(b"maxmemory-policy")  # type: ignore[call-overload]
    policy = raw.decode() if isinstance(raw, bytes) else str(raw or "")
    if policy != REQUIRED_POLICY:
        _refuse(policy)
    return policy


def _refuse(policy: str) -> None:
    raise UnsafeRedisPolicy(
        f"redis maxmemory-policy is {policy!r}: it may evict sessiond's state (activity,"
        f" access journal, version keys); set maxmemory-policy {REQUIRED_POLICY}"
        " (or SESSIOND_REDIS_POLICY_CHECK=false to start anyway)"
    )
