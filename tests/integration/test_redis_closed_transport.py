"""A command on a connection whose transport was closed under it (a Redis master killed while
requests hold its connections) is a ``ConnectionError``, the one kind the API's outage handling
and the cluster client's retries know; redis-py under uvloop raises ``RuntimeError`` there."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
import uvloop
from redis.asyncio import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from sessiond.config import Settings
from storage.redis_conn import REDIS_CONNECTION_ERRORS, connect

PING = b"*1\r\n$4\r\nPING\r\n"


def _single(settings: Settings) -> aioredis.Redis:
    client = connect(settings)
    assert isinstance(client, aioredis.Redis)  # the single-node stack
    return client


async def _write_on_closed(conn: Connection) -> BaseException | None:
    await conn.connect()  # type: ignore[no-untyped-call]
    assert conn._writer is not None
    conn._writer.transport.abort()
    await asyncio.sleep(0.05)
    try:
        await conn.send_packed_command(PING, check_health=False)
    except BaseException as exc:
        return exc
    finally:
        await conn.disconnect()
    return None


def test_plain_redis_py_raises_runtime_error_under_uvloop(settings: Settings) -> None:
    """The driver's own behaviour, pinned: if it ever raises ConnectionError itself, the
    translation in storage.redis_conn can go."""
    client = _single(settings)
    kwargs = dict(client.connection_pool.connection_kwargs)
    exc = uvloop.run(_write_on_closed(Connection(**kwargs)))
    assert isinstance(exc, RuntimeError)
    assert not isinstance(exc, REDIS_CONNECTION_ERRORS)


def test_storage_client_reports_a_closed_transport_as_connection_error(settings: Settings) -> None:
    client = _single(settings)
    conn = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
    exc = uvloop.run(_write_on_closed(conn))
    assert isinstance(exc, RedisConnectionError), repr(exc)
    assert isinstance(exc, REDIS_CONNECTION_ERRORS)


def test_the_client_still_answers_after_the_error(settings: Settings) -> None:
    async def run() -> bool:
        client = _single(settings)
        conn = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        await _write_on_closed(conn)
        try:
            return bool(await client.ping())
        finally:
            await client.aclose()

    assert uvloop.run(run())
