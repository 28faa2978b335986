"""Fault tests stop and restart the stack's servers: each test starts from empty state and, pass
or fail, leaves every server running (CI runs the rest of the suite on the same stack)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pika
import pytest

from sessiond import amqp, stack
from sessiond.config import Settings
from storage import redis_conn
from tests.conftest import Amqp, all_queues


@pytest.fixture
def servers_back(stack_config: stack.StackConfig) -> Iterator[stack.StackConfig]:
    """The stack, brought back up whatever the test did to it."""
    try:
        yield stack_config
    finally:
        for server in stack.SERVERS:
            if not stack.running(stack_config, server):
                stack.start(stack_config, server)


@pytest.fixture
async def clean(
    servers_back: stack.StackConfig,
    pg: asyncpg.Connection,
    settings: Settings,
) -> AsyncIterator[Settings]:
    """Empty tables (``pg``), empty queues, empty Redis db."""
    amqp_client = Amqp(settings)  # not held during the test: RabbitMQ may be restarted
    try:
        amqp_client.purge(*all_queues(settings))
    finally:
        amqp_client.close()
    client = redis_conn.connect(settings)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    await pg.close()  # the tests open their own connections: a fault may kill any held one
    yield settings


@pytest.fixture
def queue(settings: Settings) -> Iterator[str]:
    """A scratch queue of its own (and Dramatiq's .DQ/.XQ), deleted afterwards."""
    name = f"sessiond.test.scratch.{uuid.uuid4().hex[:8]}"
    yield name
    conn = pika.BlockingConnection(amqp.connection_parameters(settings))
    try:
        ch = conn.channel()
        for q in (name, f"{name}.DQ", f"{name}.XQ"):
            ch.queue_delete(q)
    finally:
        conn.close()
