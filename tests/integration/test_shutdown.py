"""Graceful stop: a worker stopped with SIGTERM in the middle of a stream loses no event, as when
Kubernetes stops a pod (SIGTERM to PID 1, which is Dramatiq's main process)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from sessiond.config import Settings
from tests.conftest import Amqp, Process, async_wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOTAL = 10_000  # several seconds of work, so that the stop lands mid-stream


async def test_sigterm_mid_stream_loses_no_event(
    broker_client: Amqp,
    pg: asyncpg.Connection,
    spawn: Callable[..., Process],
    settings: Settings,
    tmp_path: Path,
) -> None:
    events = [
        {"event": "connected", "user_id": f"term-{i}", "event_id": f"t{i}"} for i in range(TOTAL)
    ]
    first = spawn("worker", "--processes", "2", "--threads", "4")

    async def some_applied() -> bool:
        return int(await pg.fetchval("SELECT count(*) FROM users")) >= 100

    # Given a stream being consumed
    broker_client.publish_many(events)
    await async_wait_until(some_applied, timeout=60)

    # When the worker gets SIGTERM mid-stream
    applied_before = int(await pg.fetchval("SELECT count(*) FROM users"))
    assert first.stop() == 0, first.output()[-3000:]
    assert applied_before < len(events), "the stream was over before the stop: test proves nothing"

    # Then a new worker finishes the stream: every event applied exactly once, none dead-lettered
    spawn("worker", "--processes", "1", "--threads", "4")

    async def all_applied() -> bool:
        return int(await pg.fetchval("SELECT count(*) FROM processed_events")) >= len(events)

    await async_wait_until(all_applied, timeout=120)
    assert int(await pg.fetchval("SELECT count(*) FROM users WHERE status = 'connected'")) == TOTAL
    connects = await pg.fetchval("SELECT count(*) FROM audit_events WHERE kind = 'connected'")
    assert connects == TOTAL  # applied once in effect, even when a message was redelivered
    assert broker_client.depth(settings.dead_letter_queue) == 0
