"""The one place that builds Redis clients, for the asyncio processes (API, workers' jobs) and the
threaded scheduler alike, so a change of deployment (TLS, timeouts, a cluster) is made once.

Both clients share one set of options: a 2 s socket and connect timeout (a Redis that stops
answering must fail a request or a tick, not hang it) and, for ``rediss://`` URLs, the CA file
``SESSIOND_REDIS_CA_FILE`` to verify the server against.
"""

from __future__ import annotations

from typing import Any, Final, TypeAlias

import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sessiond.config import Settings

AsyncClient: TypeAlias = aioredis.Redis
SyncClient: TypeAlias = redis.Redis
"""What ``connect`` and ``connect_sync`` return: callers outside ``storage`` name these, never the
driver's classes."""

REDIS_CONNECTION_ERRORS: Final = (RedisConnectionError, RedisTimeoutError)
"""What Redis calls raise when the server is down, restarting or too slow: the one list the
API's outage handling (bypass Redis, 503, gRPC UNAVAILABLE) is built from, as
``storage.db.DB_CONNECTION_ERRORS`` is for PostgreSQL."""


def _options(settings: Settings, decode_responses: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "socket_timeout": 2.0,
        "socket_connect_timeout": 2.0,
        "decode_responses": decode_responses,
    }
    if settings.redis_url.startswith("rediss://") and settings.redis_ca_file:
        kwargs["ssl_ca_certs"] = settings.redis_ca_file
    return kwargs


def connect(settings: Settings, *, decode_responses: bool = False) -> AsyncClient:
    """A pooled asyncio client; ``decode_responses`` answers ``str`` instead of ``bytes``."""
    return aioredis.Redis.from_url(settings.redis_url, **_options(settings, decode_responses))


def connect_sync(settings: Settings, *, decode_responses: bool = False) -> SyncClient:
    """A pooled blocking client, for the scheduler's threads."""
    return redis.Redis.from_url(settings.redis_url, **_options(settings, decode_responses))
