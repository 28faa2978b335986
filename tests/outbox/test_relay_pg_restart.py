"""The outbox relay recovers by itself when PostgreSQL comes back (issue 11).

Tortoise's ``in_transaction`` makes the transaction the task's current connection before
``BEGIN`` and undoes that only in ``__aexit__``. A ``BEGIN`` on a pooled connection the server has
just terminated raises in ``__aenter__``, so the long-lived relay task kept a dead transaction as
its connection: after the model checker's ``stop_postgres`` one worker process logged
``InterfaceError('cannot call Connection.transaction(): connection has been released back to the
pool')`` every 15 s and never published again. Staged exactly here: the pool's idle connections
are terminated by the server while the event loop is blocked, so asyncpg learns it only from the
``BEGIN``, in the same task that then tries again.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from datetime import UTC, datetime

import pytest

from actors.outbox import Relay
from sessiond.config import Settings
from sessiond.events import Event
from storage import db as db_mod
from storage import state
from tests.outbox.support import EventsOut

pytestmark = pytest.mark.integration

PSQL = "/usr/lib/postgresql/15/bin/psql"


def terminate_others(settings: Settings) -> None:
    """Blocking on purpose: the server closes the pool's connections while the loop sleeps."""
    sql = (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    subprocess.run([PSQL, settings.database_url, "-Atc", sql], check=True, capture_output=True)
    time.sleep(0.3)


async def test_stock_in_transaction_keeps_the_dead_transaction(db: Settings) -> None:
    """The cause, on Tortoise's own context manager: the task is stuck after one failed BEGIN."""
    from tortoise.transactions import in_transaction

    async with in_transaction() as tx:
        await tx.execute_query("SELECT 1")
    terminate_others(db)
    with pytest.raises(db_mod.DB_CONNECTION_ERRORS):
        async with in_transaction() as tx:
            await tx.execute_query("SELECT 1")
    for _ in range(2):  # not a passing failure: every later transaction of this task
        with pytest.raises(db_mod.DB_CONNECTION_ERRORS, match="released back to the pool"):
            async with in_transaction() as tx:
                await tx.execute_query("SELECT 1")


async def test_a_failed_begin_leaves_the_task_usable(db: Settings) -> None:
    async with db_mod.transaction() as tx:  # the pool holds an idle, open connection
        await tx.execute_query("SELECT 1")
    terminate_others(db)
    with pytest.raises(db_mod.DB_CONNECTION_ERRORS):
        async with db_mod.transaction() as tx:
            await tx.execute_query("SELECT 1")
    # The same task again: a new connection, not the dead transaction
    async with db_mod.transaction() as tx:
        assert (await tx.execute_query_dict("SELECT 1 AS one"))[0]["one"] == 1


async def test_the_relay_publishes_again_after_its_connections_were_terminated(
    db: Settings,
) -> None:
    """The relay's own round, in one task as its loop runs it: one round meets the terminated
    connection, the next one publishes."""
    consumer = EventsOut(db, queue="test.events-out.pgterminate")
    relay = Relay(db)
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    try:
        await _login("u1", at)
        assert await relay.step() == 1
        for cycle in range(3):
            user = f"after{cycle}"
            await _login(user, at)
            terminate_others(db)
            with pytest.raises(db_mod.DB_CONNECTION_ERRORS):
                await relay.step()
            assert await relay.step() == 1, f"cycle {cycle}"
            await _published(consumer, user)
    finally:
        await relay.publisher.close()
        consumer.conn.close()


async def _login(user_id: str, at: datetime) -> None:
    """This task's own transaction may meet a terminated connection first: tried again."""
    for attempt in range(3):
        try:
            await state.apply_event(
                Event(kind="connected", user_id=user_id, session_id="s", occurred_at=at)
            )
            return
        except db_mod.DB_CONNECTION_ERRORS:
            if attempt == 2:
                raise


async def _published(consumer: EventsOut, user_id: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(b.get("user_id") == user_id for b in await asyncio.to_thread(consumer.poll)):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{user_id}'s session.started never went out")
