"""One dead-letter path (``actors.retry``), on the real stack: a message past its budget goes to
``SESSIOND_DEAD_LETTER_QUEUE``, never to Dramatiq's ``<queue>.XQ``; a job tick that fails, or is
too old to matter, is dropped and acknowledged (the next tick is its retry)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import asyncpg
import dramatiq
import pytest

from actors import deadletter, messages
from actors.jobs import EXPIRE, FLUSH
from actors.messages import RECORD_DEAD_LETTER
from actors.topology import JOBS_QUEUE
from sessiond.config import Settings
from tests.conftest import Amqp, Process, truncate, wait_until
from tests.integration.test_ingest_order import WORKER, started

pytestmark = pytest.mark.integration

XQ = f"{JOBS_QUEUE}.XQ"


def _old(message: dramatiq.Message[object], age_s: float) -> dramatiq.Message[object]:
    return message.copy(message_timestamp=int((time.time() - age_s) * 1000))


async def _journaled(settings: Settings) -> int:
    conn = await asyncpg.connect(settings.database_url, timeout=5)
    try:
        n = await conn.fetchval("SELECT count(*) FROM audit_events WHERE kind = 'dead_lettered'")
        return int(n)
    finally:
        await conn.close()


async def test_a_journal_past_its_budget_is_dead_lettered_whole_and_replays_to_its_queue(
    spawn: Callable[..., Process], broker_client: Amqp, migrated: Settings
) -> None:
    settings = migrated
    await truncate(settings)
    worker = spawn(*WORKER)
    started(worker, settings.ingest_queue, settings)
    # Given a journal message that cannot run (no arguments), older than the age budget
    broken: dramatiq.Message[object] = dramatiq.Message(
        queue_name=JOBS_QUEUE, actor_name=RECORD_DEAD_LETTER, args=(), kwargs={}, options={}
    )
    messages.publish(broker_client.ch, _old(broken, settings.retry_max_age_s + 60))

    # Then it waits in the dead-letter queue, named by its actor, and nothing went to .XQ
    wait_until(lambda: broker_client.depth(settings.dead_letter_queue) >= 1, timeout=60)
    [letter] = list(deadletter.listing(settings, limit=10))
    assert (letter.reason, letter.actor, letter.source_queue) == (
        "too_old",
        RECORD_DEAD_LETTER,
        JOBS_QUEUE,
    )
    assert "TypeError" in letter.detail, letter.detail
    assert broker_client.depth(XQ) == 0
    # ... and, being a journal itself, it journals nothing (no letter about a letter)
    time.sleep(1.0)
    assert await _journaled(settings) == 0
    assert broker_client.depth(settings.dead_letter_queue) == 1

    # When it is replayed with no worker running
    assert worker.stop() == 0, worker.output()[-3000:]
    assert deadletter.replay(settings, reason="too_old") == 1

    # Then it is back on its queue as a fresh message: same actor and arguments, a full budget
    method, _props, body = broker_client.ch.basic_get(JOBS_QUEUE, auto_ack=True)
    assert method is not None
    replayed = json.loads(body)
    assert (replayed["actor_name"], replayed["args"], replayed["options"]) == (
        RECORD_DEAD_LETTER,
        [],
        {},
    )
    assert replayed["message_timestamp"] > time.time() * 1000 - 60_000
    assert broker_client.depth(settings.dead_letter_queue) == 0


def test_a_failed_or_stale_job_tick_is_dropped_not_dead_lettered(
    spawn: Callable[..., Process], broker_client: Amqp, migrated: Settings
) -> None:
    settings = migrated
    worker = spawn(*WORKER, env={"SESSIOND_LOG_LEVEL": "INFO"})
    started(worker, settings.ingest_queue, settings)
    # Given a tick that fails (an argument the job does not take) and one far too old
    failing: dramatiq.Message[object] = dramatiq.Message(
        queue_name=JOBS_QUEUE, actor_name=FLUSH, args=(), kwargs={"bogus": 1}, options={}
    )
    messages.publish(broker_client.ch, failing)
    messages.publish(broker_client.ch, _old(messages.job_tick(EXPIRE, 0.0), 86_400))

    # Then both are dropped and acknowledged: no retry, no dead letter, nothing in .XQ
    wait_until(lambda: "job failed; the next tick runs it again" in worker.output(), timeout=60)
    wait_until(lambda: "job message too old; dropped" in worker.output(), timeout=60)
    wait_until(lambda: broker_client.depth(JOBS_QUEUE) == 0, timeout=30)
    assert broker_client.depth(XQ) == 0
    assert broker_client.depth(settings.dead_letter_queue) == 0
