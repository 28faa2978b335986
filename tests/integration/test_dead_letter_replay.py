"""Dead letters keep their stamp (issue 11, scenario 3), on the real stack: a login dead-lettered
while PostgreSQL was down, replayed after the user's logout, does not bring the user back; a
replay of an event that was applied is a no-op."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from actors import deadletter
from sessiond import stack
from sessiond.config import Settings
from sessiond.stamps import parse_stamp
from tests.conftest import Amqp, Process, async_wait_until, truncate, wait_until
from tests.integration.test_ingest_order import WORKER, started

pytestmark = pytest.mark.integration

# One retry, quickly: the budget is spent while the server is down.
FAST_BUDGET = {
    "SESSIOND_RETRY_MAX": "1",
    "SESSIOND_RETRY_MIN_BACKOFF_MS": "100",
    "SESSIOND_RETRY_MAX_BACKOFF_MS": "200",
}


@pytest.fixture
async def fresh_db(migrated: Settings) -> AsyncIterator[Settings]:
    """An emptied database; tests open their own connections (PostgreSQL restarts in them)."""
    await truncate(migrated)
    yield migrated


async def fetch(settings: Settings, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.database_url, timeout=5)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def audit(settings: Settings, user_id: str) -> list[tuple[str, str | None]]:
    rows = await fetch(
        settings, "SELECT kind, reason FROM audit_events WHERE user_id = $1 ORDER BY id", user_id
    )
    return [(r["kind"], r["reason"]) for r in rows]


async def status(settings: Settings, user_id: str) -> str | None:
    rows = await fetch(settings, "SELECT status FROM users WHERE id = $1", user_id)
    return rows[0]["status"] if rows else None


def replay(spawn: Callable[..., Process], reason: str) -> dict[str, int]:
    proc = spawn("dlq", "replay", "--reason", reason)
    wait_until(lambda: not proc.alive(), timeout=60)
    assert proc.stop() == 0, proc.output()[-2000:]
    last = [line for line in proc.output().splitlines() if line.startswith('{"replayed"')]
    return dict(json.loads(last[-1]))


async def test_replayed_login_does_not_undo_the_logout_after_it(
    spawn: Callable[..., Process],
    broker_client: Amqp,
    fresh_db: Settings,
    stack_config: stack.StackConfig,
) -> None:
    settings = fresh_db
    worker = spawn(*WORKER, env=FAST_BUDGET)
    started(worker, settings.ingest_queue, settings)
    # Given a seed-form login dead-lettered (retries exhausted) while PostgreSQL was down
    stack.stop(stack_config, "postgres")
    try:
        broker_client.publish({"event": "connected", "user_id": "dl-user"})
        wait_until(lambda: broker_client.depth(settings.dead_letter_queue) >= 1, timeout=90)
    finally:
        stack.start(stack_config, "postgres")
    [letter] = list(deadletter.listing(settings, limit=10))
    assert letter.reason == "retries_exhausted"
    received = parse_stamp(letter.received_at)
    failed = parse_stamp(letter.failed_at)
    assert received is not None and failed is not None and received < failed
    # ... then the user's logout, applied
    broker_client.publish({"event": "disconnected", "user_id": "dl-user"})

    async def logout_applied() -> bool:
        return await status(settings, "dl-user") == "disconnected"

    await async_wait_until(logout_applied, timeout=60)
    # When the dead letters are replayed
    assert replay(spawn, "retries_exhausted") == {"replayed": 1}

    # Then the login keeps its first stamp, is older than the logout, and changes nothing
    async def replay_seen() -> bool:
        return ("ignored", "stale") in await audit(settings, "dl-user")

    await async_wait_until(replay_seen, timeout=60)
    assert await status(settings, "dl-user") == "disconnected"
    rows = await fetch(settings, "SELECT status FROM sessions WHERE user_id = 'dl-user'")
    assert [r["status"] for r in rows] in ([], ["ended"])
    assert broker_client.depth(settings.dead_letter_queue) == 0


async def test_replay_of_an_applied_event_is_a_no_op(
    spawn: Callable[..., Process],
    broker_client: Amqp,
    fresh_db: Settings,
    stack_config: stack.StackConfig,
) -> None:
    settings = fresh_db
    worker = spawn(*WORKER, env=FAST_BUDGET)
    started(worker, settings.ingest_queue, settings)
    # Given a seed-form login committed to PostgreSQL whose Redis sync kept failing (Redis
    # down), so that it was dead-lettered after it was applied
    stack.stop(stack_config, "redis")
    try:
        broker_client.publish({"event": "connected", "user_id": "dup-user"})
        wait_until(lambda: broker_client.depth(settings.dead_letter_queue) >= 1, timeout=90)
    finally:
        stack.start(stack_config, "redis")
    assert await status(settings, "dup-user") == "connected"
    # When it is replayed
    assert replay(spawn, "retries_exhausted") == {"replayed": 1}

    # Then it is recognised as the same event: a duplicate, journaled once, nothing changes
    async def duplicate_seen() -> bool:
        return ("ignored", "duplicate") in await audit(settings, "dup-user")

    await async_wait_until(duplicate_seen, timeout=60)
    kinds = await audit(settings, "dup-user")
    assert kinds.count(("connected", None)) == 1
    assert await status(settings, "dup-user") == "connected"
    sessions = await fetch(settings, "SELECT count(*) AS n FROM processed_events")
    assert sessions[0]["n"] == 1
