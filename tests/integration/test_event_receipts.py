"""A copy of an event gets back the stamps its first receipt was given (the model checker's
``s20261202-255``), on the real stack: the store (``storage.receipts``), then the ingress running
in this process on the real ingest queue with Tortoise on an event-loop thread as in a worker,
the forwarded events applied in the order a retry would apply them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import dramatiq
import pika
import pytest
from dramatiq.asyncio import EventLoopThread

from actors import stamping, topology
from actors.ingress import Ingress
from actors.sources import auth_source
from sessiond import amqp, stack
from sessiond.config import Settings
from sessiond.events import Event
from storage import receipts, state
from storage.receipts import Receipt, Settled
from tests.conftest import Amqp, wait_until

pytestmark = pytest.mark.integration

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def counted(_key: str) -> Settled:
    """Every stored receipt was committed (its batch's high-water is far ahead)."""
    return Settled(T0 + timedelta(days=1))


async def test_the_store_keeps_the_first_receipt_of_each_key(
    db: Settings, pg: asyncpg.Connection
) -> None:
    # Given a key received once
    first = Receipt("auth:id:1:u:7", T0, T0 - timedelta(seconds=1))
    assert await receipts.remember([first], counted) == {first.key: first}
    # When a batch holds a copy of it (later stamps), a new key twice, and a third key
    copy = Receipt(first.key, T0 + timedelta(minutes=5), T0 + timedelta(minutes=5))
    new = Receipt("auth:id:1:u:8", T0 + timedelta(minutes=6), T0 + timedelta(minutes=6))
    new_again = Receipt(new.key, T0 + timedelta(minutes=7), T0 + timedelta(minutes=7))
    other = Receipt("auth:id:1:v:8", T0 + timedelta(minutes=8), T0 + timedelta(minutes=8))
    stored = await receipts.remember([copy, new, new_again, other], counted)
    # Then every key comes back with its first receipt: the stored row wins over the copy, the
    # batch's first occurrence over its later one (one statement, no "row touched twice")
    assert stored == {first.key: first, new.key: new, other.key: other}
    rows = await pg.fetch("SELECT key, received_at, stamped_at FROM event_receipts ORDER BY key")
    assert [Receipt(r["key"], r["received_at"], r["stamped_at"]) for r in rows] == [
        first,
        new,
        other,
    ]
    assert await receipts.remember([], counted) == {}


async def test_a_stored_receipt_that_does_not_count_is_replaced(
    db: Settings, pg: asyncpg.Connection
) -> None:
    # Given five keys stored at T0 (by attempts the caller will judge)
    keys = ["kept-at", "kept-below", "above", "unknown", "void"]
    stored = [Receipt(k, T0, T0 - timedelta(seconds=1)) for k in keys]
    await receipts.remember(stored, lambda _k: Settled(None))
    # When copies come with later stamps, each with what is known to count for its key
    later = T0 + timedelta(minutes=1)
    bounds = {
        "kept-at": Settled(T0),  # committed up to exactly its stamp
        "kept-below": Settled(later, (T0 - timedelta(hours=1), T0 - timedelta(seconds=1))),
        "above": Settled(T0 - timedelta(microseconds=1)),  # stored after the last commit
        "unknown": Settled(None),  # no high-water known
        "void": Settled(later, (T0 - timedelta(seconds=1), T0)),  # a failed attempt's stamps
    }
    got = await receipts.remember([Receipt(k, later, later) for k in keys], bounds.__getitem__)
    # Then the rows that count are kept, the others take this attempt's stamps
    fresh = {k: Receipt(k, later, later) for k in ("above", "unknown", "void")}
    expected = {**{r.key: r for r in stored[:2]}, **fresh}
    assert got == expected
    rows = await pg.fetch("SELECT key, received_at, stamped_at FROM event_receipts")
    assert {r["key"]: Receipt(r["key"], r["received_at"], r["stamped_at"]) for r in rows} == (
        expected
    )


@pytest.fixture
def ingress(
    settings: Settings, broker_client: Amqp, storage_loop: EventLoopThread
) -> Iterator[Ingress]:
    """The production source and decoder on the real ingest queue; no worker consumes the
    partition queues, so each test reads what was forwarded and applies it itself."""
    thread = Ingress(
        settings, [auth_source(settings)], stamping.on_loop(storage_loop.run_coroutine)
    )
    thread.start()
    wait_until(lambda: consumed(settings), timeout=30)
    try:
        yield thread
    finally:
        thread.stop()
        broker_client.purge(topology.stamp_queue(settings.ingest_queue))


def consumed(settings: Settings) -> bool:
    conn = pika.BlockingConnection(amqp.connection_parameters(settings))
    try:
        ok = conn.channel().queue_declare(settings.ingest_queue, passive=True)
        return int(ok.method.consumer_count) > 0
    finally:
        conn.close()


def forwarded(settings: Settings) -> list[dict[str, Any]]:
    """The items waiting in the partition queues, taken off them."""
    items: list[dict[str, Any]] = []
    conn = pika.BlockingConnection(amqp.connection_parameters(settings))
    try:
        ch = conn.channel()
        for queue in topology.partition_queues(settings.partitions):
            while True:
                method, _props, body = ch.basic_get(queue, auto_ack=True)
                if method is None:
                    break
                items += dramatiq.Message.decode(body).args[0]
    finally:
        conn.close()
    return items


def publish_and_take(
    client: Amqp, settings: Settings, bodies: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Publishes (confirmed), waits until the ingress forwarded them all; items by event_id."""
    for body in bodies:
        client.publish(body)
    got: list[dict[str, Any]] = []

    def all_there() -> bool:
        got.extend(forwarded(settings))
        return len(got) >= len(bodies)

    wait_until(all_there, timeout=30)
    assert len(got) == len(bodies)
    return {item["event"]["event_id"]: item for item in got}


def apply(loop: EventLoopThread, item: dict[str, Any]) -> state.Outcome:
    """What the partition actor does with one item (its Redis sync aside)."""
    return loop.run_coroutine(state.apply_event(Event.from_wire(item["event"])))


async def status(pg: asyncpg.Connection, user_id: str) -> str | None:
    found = await pg.fetchval("SELECT status FROM users WHERE id = $1", user_id)
    return None if found is None else str(found)


async def test_a_copy_that_overtakes_its_original_keeps_the_first_stamps(
    ingress: Ingress,
    broker_client: Amqp,
    settings: Settings,
    storage_loop: EventLoopThread,
    raw_pg: asyncpg.Connection,
) -> None:
    user = "copy-user"
    login1 = {"event": "connected", "user_id": user, "event_id": f"{user}-1"}
    logout = {"event": "disconnected", "user_id": user, "event_id": f"{user}-2"}
    login2 = {"event": "connected", "user_id": user, "event_id": f"{user}-3"}
    # Given a seed-form login and logout (no occurred_at) forwarded; the login is applied, the
    # logout is held back (PostgreSQL was down for it: it waits in Dramatiq's retries)
    first = publish_and_take(broker_client, settings, [login1, logout])
    assert apply(storage_loop, first[login1["event_id"]]).applied
    original = first[logout["event_id"]]
    # ... and a later login, forwarded and applied
    later = publish_and_take(broker_client, settings, [login2])[login2["event_id"]]
    assert apply(storage_loop, later).applied
    # When the publisher re-publishes the logout (its confirm was lost) and the copy is applied
    # before the original's retry
    copy = publish_and_take(broker_client, settings, [logout])[logout["event_id"]]
    # Then the copy carries the original's stamps, older than the later login's
    for field in ("received_at", "stamped_at"):
        assert copy[field] == original[field], field
    assert copy["event"]["occurred_at"] == original["event"]["occurred_at"]
    assert copy["event"]["occurred_at"] < later["event"]["occurred_at"]
    # ... so it ends no session the later login opened (a logout ends what began before it)
    assert apply(storage_loop, copy).ended_sessions == []
    # ... the original is then its duplicate
    assert apply(storage_loop, original).reason == "duplicate"
    # ... and the user ends as the events say in publish order (login, logout, login): connected
    assert await status(raw_pg, user) == "connected"
    assert ingress.forwarded == 4


async def test_events_with_their_own_time_need_no_receipt(
    ingress: Ingress,
    broker_client: Amqp,
    settings: Settings,
    raw_pg: asyncpg.Connection,
) -> None:
    # Given events with occurred_at (one with an event_id), and one without an event_id
    timed = {
        "event": "connected",
        "user_id": "timed",
        "event_id": "timed-1",
        "occurred_at": "2026-12-02T12:00:00+00:00",
    }
    anonymous = {"event": "connected", "user_id": "anonymous", "event_id": None}
    got = publish_and_take(broker_client, settings, [timed])
    assert got["timed-1"]["event"]["occurred_at"] == "2026-12-02T12:00:00+00:00"
    publish_and_take(broker_client, settings, [anonymous])
    # Then no first receipt was stored: their copies are told apart by their own fields
    assert await raw_pg.fetchval("SELECT count(*) FROM event_receipts") == 0
    # ... while an event whose time is its stamp gets one
    publish_and_take(broker_client, settings, [{**anonymous, "event_id": "anonymous-1"}])
    rows = await raw_pg.fetch("SELECT key FROM event_receipts")
    assert [r["key"] for r in rows] == ["auth:id:9:anonymous:anonymous-1"]


async def test_postgresql_down_holds_the_batch_until_it_is_back(
    ingress: Ingress,
    broker_client: Amqp,
    settings: Settings,
    stack_config: stack.StackConfig,
    raw_pg: asyncpg.Connection,
) -> None:
    # Given PostgreSQL stopped
    await raw_pg.close()
    stack.stop(stack_config, "postgres")
    try:
        # When a seed-form event with an event_id comes (its receipt cannot be stored)
        broker_client.publish({"event": "disconnected", "user_id": "held", "event_id": "h-1"})
        # Then it is not forwarded with a fresh stamp: its batch fails and is read again, for
        # as long as PostgreSQL is away (retried every 2 s at most)
        time.sleep(5)
        assert forwarded(settings) == [] and ingress.forwarded == 0
        assert ingress.is_alive()
    finally:
        stack.start(stack_config, "postgres")
    # ... and once PostgreSQL is back it goes, with a stored first receipt
    got: list[dict[str, Any]] = []

    def there() -> bool:
        got.extend(forwarded(settings))
        return bool(got)

    wait_until(there, timeout=60)
    [item] = got
    assert item["event"]["event_id"] == "h-1"
    conn = await asyncpg.connect(settings.database_url)
    try:
        row = await conn.fetchrow("SELECT received_at, stamped_at FROM event_receipts")
    finally:
        await conn.close()
    assert row is not None
    assert row["received_at"] == datetime.fromisoformat(item["received_at"])
    assert row["stamped_at"] == datetime.fromisoformat(item["stamped_at"])
