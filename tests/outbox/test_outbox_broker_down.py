"""RabbitMQ down: expiries still commit, and once it is back every ``session.ended`` is published
exactly once, by a real ``sessiond worker``'s relay; a test consumer counts them.

This test stops the stack's RabbitMQ. On a machine where several suites share one stack (they set
``SESSIOND_TEST_ISOLATION``), it runs only against a private stack (``SESSIOND_STACK_DIR`` and
ports of its own), so that it never disturbs the others."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from sessiond import stack
from sessiond.config import Settings
from sessiond.events import Event
from storage import cache as cache_mod
from storage import expiry, state
from storage.activity import ActivityBuffer
from tests.conftest import Process, wait_until
from tests.outbox.support import EventsOut

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(os.environ.get("SESSIOND_TEST_ISOLATION"))
        and not os.environ.get("SESSIOND_STACK_DIR"),
        reason="stops RabbitMQ: run it on a private stack (SESSIOND_STACK_DIR) when sharing one",
    ),
]

USERS = [f"down-{i}" for i in range(25)]
QUEUE = "test.events-out.broker-down"


@pytest.fixture
def worker(migrated: Settings, test_env: dict[str, str], tmp_path: Path) -> Iterator[Process]:
    log = tmp_path / "worker.log"
    argv = [sys.executable, "-m", "sessiond.cli", "worker", "--processes", "1", "--threads", "2"]
    proc = Process(argv, {**test_env, "SESSIOND_OUTBOX_POLL_S": "0.1"}, log)
    yield proc
    assert proc.alive(), f"worker died:\n{proc.output()[-3000:]}"
    assert proc.stop() == 0, proc.output()[-3000:]


@pytest.fixture
def pg(orm_pg: asyncpg.Connection) -> asyncpg.Connection:
    return orm_pg


def count(consumer: EventsOut, event_type: str) -> Counter[str]:
    return Counter(str(b["user_id"]) for b in consumer.poll() if b["type"] == event_type)


async def test_expiries_commit_while_rabbitmq_is_down_and_are_published_once_after(
    worker: Process,
    pg: asyncpg.Connection,
    cache: cache_mod.Cache,
    settings: Settings,
    stack_config: stack.StackConfig,
) -> None:
    # Given users connected 40 minutes ago, their session.started already published
    connected_at = datetime.now(UTC) - timedelta(minutes=40)
    consumer = EventsOut(settings, queue=QUEUE)
    for uid in USERS:
        outcome = await state.apply_event(
            Event(kind="connected", user_id=uid, session_id="web", occurred_at=connected_at)
        )
        await state.publish_snapshot(cache, outcome)
    wait_until(lambda: sum(count(consumer, "session.started").values()) == len(USERS), timeout=60)
    consumer.conn.close()

    # When RabbitMQ stops and the idle sweep runs
    stack.stop(stack_config, "rabbitmq")
    try:
        result = await expiry.sweep(
            cache, ActivityBuffer(cache.client), now=datetime.now(UTC), idle_timeout_s=1800,
            batch_size=10,
        )  # fmt: skip
        # Then the expiries committed all the same, their events waiting in the outbox
        assert result.expired == len(USERS)
        assert await pg.fetchval("SELECT count(*) FROM users WHERE status = 'connected'") == 0
        pending = await pg.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        assert pending == 2 * len(USERS)
        time.sleep(3)  # the relay keeps failing meanwhile
        assert await pg.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == pending
    finally:
        stack.start(stack_config, "rabbitmq")

    # When RabbitMQ is back, every session.ended is published exactly once
    consumer = wait_until(lambda: EventsOut.reconnect(settings, QUEUE), timeout=60)
    try:
        wait_until(
            lambda: sum(count(consumer, "user.disconnected").values()) == len(USERS), timeout=90
        )
        time.sleep(2)  # anything extra would show up now
        ended = count(consumer, "session.ended")
        assert ended == Counter({uid: 1 for uid in USERS})
        assert count(consumer, "user.disconnected") == Counter({uid: 1 for uid in USERS})
        bodies = consumer.poll()
        assert len({b["event_id"] for b in bodies}) == len(bodies)
        assert {b["reason"] for b in bodies if b["type"] == "session.ended"} == {"idle_timeout"}
        assert await pg.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0
    finally:
        consumer.close()
