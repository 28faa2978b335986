"""Fault tests stop and restart the stack's servers: each test starts from empty state and, pass
or fail, leaves every server running (CI runs the rest of the suite on the same stack)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from sessiond import stack
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
