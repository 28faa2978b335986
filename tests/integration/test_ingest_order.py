"""Queue order is event order for events without a time (issue 11, scenarios 1 and 6), on the real
broker with real ``sessiond worker`` processes: a single active consumer per ingest queue, stamps
that never go backwards (also across a hand-over), the AMQP ``timestamp`` property, and the
migration of a legacy queue declared without a single active consumer."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pika
import pika.exceptions
import pytest

from actors import topology
from sessiond import amqp
from sessiond.config import Settings
from sessiond.stamps import TICK, parse_stamp
from tests.conftest import Amqp, Process, async_wait_until, wait_until

pytestmark = pytest.mark.integration

WORKER = ("worker", "--processes", "2", "--threads", "4")


async def processed(pg: asyncpg.Connection) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM processed_events"))


async def statuses(pg: asyncpg.Connection, prefix: str) -> dict[str, str]:
    rows = await pg.fetch("SELECT id, status FROM users WHERE id LIKE $1", prefix + "%")
    return {r["id"]: r["status"] for r in rows}


async def wait_processed(pg: asyncpg.Connection, n: int, timeout: float) -> None:
    async def done() -> bool:
        return await processed(pg) >= n

    await async_wait_until(done, timeout=timeout, interval=0.25)


def started(proc: Process, queue: str, settings: Settings) -> None:
    """Waits until the worker's ingress has declared its queues (its consumers exist)."""

    def consuming() -> bool:
        assert proc.alive(), proc.output()[-3000:]
        conn = pika.BlockingConnection(amqp.connection_parameters(settings))
        try:
            ok = conn.channel().queue_declare(queue, passive=True)
            return int(ok.method.consumer_count) > 0
        except pika.exceptions.ChannelClosedByBroker:
            return False
        finally:
            conn.close()

    wait_until(consuming, timeout=60, interval=0.3)


async def test_seed_pairs_back_to_back_leave_every_user_disconnected(
    spawn: Callable[..., Process], broker_client: Amqp, pg: asyncpg.Connection, settings: Settings
) -> None:
    # Given two `sessiond worker --processes 2` commands (four ingress consumers)
    workers = [spawn(*WORKER), spawn(*WORKER)]
    for w in workers:
        started(w, settings.ingest_queue, settings)
    # When 1,200 users each log in and out in the seed's form (no occurred_at, no event_id),
    # published back to back
    users = [f"pair-{i}" for i in range(1200)]
    bodies: list[dict[str, Any]] = []
    for uid in users:
        bodies.append({"event": "connected", "user_id": uid, "name": "N", "email": "n@x.org"})
        bodies.append({"event": "disconnected", "user_id": uid})
    broker_client.publish_many(bodies)
    await wait_processed(pg, len(bodies), timeout=240)
    # Then every user ends disconnected and no logout was refused as stale (a login may be,
    # when the partition's threads commit its logout first: it is older, and stays refused)
    final = await statuses(pg, "pair-")
    assert len(final) == len(users)
    connected = sorted(u for u, s in final.items() if s != "disconnected")
    assert connected == [], f"{len(connected)} users still connected, e.g. {connected[:5]}"
    stale_logouts = await pg.fetchval(
        "SELECT count(*) FROM audit_events WHERE kind = 'ignored' AND user_id LIKE 'pair-%'"
        " AND detail->>'event' = 'disconnected'"
    )
    assert stale_logouts == 0
    for w in workers:
        assert w.alive(), w.output()[-3000:]


def test_ingest_queue_has_a_single_active_consumer(broker_client: Amqp, settings: Settings) -> None:
    # A declaration without the argument is refused: the queue was declared with it
    ch = broker_client.conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        ch.queue_declare(settings.ingest_queue, durable=True)
    assert refused.value.reply_code == 406
    assert "x-single-active-consumer" in refused.value.reply_text


def _publish_high_water(settings: Settings, stamp: datetime) -> None:
    conn = pika.BlockingConnection(amqp.connection_parameters(settings))
    try:
        ch = conn.channel()
        topology.declare_stamp_queue(ch, settings, settings.ingest_queue)
        ch.queue_purge(topology.stamp_queue(settings.ingest_queue))
        topology.write_high_water(ch, settings.ingest_queue, stamp)
    finally:
        conn.close()


def _read_high_water(settings: Settings) -> datetime | None:
    conn = pika.BlockingConnection(amqp.connection_parameters(settings))
    try:
        method, _props, body = conn.channel().basic_get(
            topology.stamp_queue(settings.ingest_queue), auto_ack=False
        )
        return parse_stamp(body) if method is not None else None
    finally:
        conn.close()


async def test_a_new_active_consumer_never_stamps_before_the_last_one(
    spawn: Callable[..., Process], broker_client: Amqp, pg: asyncpg.Connection, settings: Settings
) -> None:
    # Given a previous active consumer whose clock ran an hour ahead: its last stamp is the
    # high-water mark in RabbitMQ
    ahead = datetime.now(UTC) + timedelta(hours=1)
    _publish_high_water(settings, ahead)
    try:
        await _hand_over(spawn, broker_client, pg, settings, ahead)
    finally:
        broker_client.purge(topology.stamp_queue(settings.ingest_queue))  # the clock is not ahead


async def _hand_over(
    spawn: Callable[..., Process],
    broker_client: Amqp,
    pg: asyncpg.Connection,
    settings: Settings,
    ahead: datetime,
) -> None:
    first = spawn(*WORKER)
    started(first, settings.ingest_queue, settings)
    # When a seed-form login arrives
    broker_client.publish({"event": "connected", "user_id": "hw-user"})
    await wait_processed(pg, 1, timeout=60)
    # Then it is stamped after that mark, and the mark moved with it
    login_at = await pg.fetchval("SELECT last_event_at FROM sessions WHERE user_id = 'hw-user'")
    assert login_at > ahead
    mark = _read_high_water(settings)
    assert mark is not None and mark >= login_at

    # When that worker goes and another (whose clock is an hour behind that stamp) takes over
    assert first.stop() == 0, first.output()[-3000:]
    second = spawn(*WORKER)
    started(second, settings.ingest_queue, settings)
    broker_client.publish({"event": "disconnected", "user_id": "hw-user"})
    await wait_processed(pg, 2, timeout=60)
    # Then the logout is stamped after the login and applies
    assert await statuses(pg, "hw-user") == {"hw-user": "disconnected"}
    logout_at = await pg.fetchval("SELECT ended_at FROM sessions WHERE user_id = 'hw-user'")
    assert logout_at > login_at


async def test_amqp_timestamp_is_the_time_of_an_event_without_one(
    spawn: Callable[..., Process], broker_client: Amqp, pg: asyncpg.Connection, settings: Settings
) -> None:
    worker = spawn(*WORKER)
    started(worker, settings.ingest_queue, settings)
    # Given a publisher that sets the AMQP timestamp (whole seconds) but no occurred_at
    sent = int((datetime.now(UTC) - timedelta(days=1)).timestamp())
    props = pika.BasicProperties(delivery_mode=2, timestamp=sent)
    ch = broker_client.ch
    for body in (
        {"event": "connected", "user_id": "ts-user"},
        {"event": "disconnected", "user_id": "ts-user"},
    ):
        ch.basic_publish(settings.events_exchange, "auth.ts", json.dumps(body).encode(), props)
    await wait_processed(pg, 2, timeout=60)
    # Then the login is at that second, and the logout of the same second just after it
    row = await pg.fetchrow(
        "SELECT started_at, ended_at, status FROM sessions WHERE user_id = 'ts-user'"
    )
    at = datetime.fromtimestamp(sent, tz=UTC)
    assert row["started_at"] == at
    assert row["ended_at"] == at + TICK
    assert row["status"] == "ended"


async def test_event_ids_are_per_user(
    spawn: Callable[..., Process], broker_client: Amqp, pg: asyncpg.Connection, settings: Settings
) -> None:
    # Scenario 6: two users' publishers both number their events from 7
    worker = spawn(*WORKER)
    started(worker, settings.ingest_queue, settings)
    broker_client.publish({"event": "connected", "user_id": "dedup-a", "event_id": "7"})
    broker_client.publish({"event": "connected", "user_id": "dedup-b", "event_id": "7"})
    # a true duplicate of A's event is still a no-op
    broker_client.publish({"event": "connected", "user_id": "dedup-a", "event_id": "7"})
    await async_wait_until(lambda: _audit_count(pg, "dedup-%", 3), timeout=60)
    assert await statuses(pg, "dedup-") == {"dedup-a": "connected", "dedup-b": "connected"}
    ignored = await pg.fetch(
        "SELECT user_id, reason FROM audit_events WHERE kind = 'ignored' AND user_id LIKE 'dedup-%'"
    )
    assert [(r["user_id"], r["reason"]) for r in ignored] == [("dedup-a", "duplicate")]


async def _audit_count(pg: asyncpg.Connection, like: str, n: int) -> bool:
    got = await pg.fetchval("SELECT count(*) FROM audit_events WHERE user_id LIKE $1", like)
    return int(got) >= n


async def test_a_legacy_queue_is_drained_in_order_before_the_new_one(
    spawn: Callable[..., Process], broker_client: Amqp, pg: asyncpg.Connection, settings: Settings
) -> None:
    legacy = topology.legacy_queue(settings.ingest_queue)
    assert legacy is not None
    # Given the queue an older release declared (no single active consumer), bound to the
    # exchange, holding a backlog: per user login, logout, login, logout (seed form)
    ch = broker_client.conn.channel()
    ch.queue_delete(legacy)
    ch.queue_declare(legacy, durable=True)
    ch.queue_bind(legacy, settings.events_exchange, routing_key="#")
    ch.confirm_delivery()
    users = [f"legacy-{i}" for i in range(200)]
    backlog = 0
    for kind in ("connected", "disconnected", "connected", "disconnected"):
        for uid in users:
            body = json.dumps({"event": kind, "user_id": uid}).encode()
            ch.basic_publish("", legacy, body, pika.BasicProperties(delivery_mode=2))
            backlog += 1
    # When the new workers start (both processes try to drain it; one may, alone)
    worker = spawn(*WORKER)
    # Then the backlog is applied in order, the legacy queue is deleted, and new events flow
    await wait_processed(pg, backlog, timeout=120)

    def legacy_gone() -> bool:
        probe = broker_client.conn.channel()
        try:
            probe.queue_declare(legacy, passive=True)
            return False
        except pika.exceptions.ChannelClosedByBroker as exc:
            return bool(exc.reply_code == 404)

    wait_until(legacy_gone, timeout=60, interval=0.3)
    final = await statuses(pg, "legacy-")
    assert set(final.values()) == {"disconnected"} and len(final) == len(users)
    broker_client.publish({"event": "connected", "user_id": "legacy-after"})
    await wait_processed(pg, backlog + 1, timeout=60)
    assert await statuses(pg, "legacy-after") == {"legacy-after": "connected"}
    assert "legacy ingest queue drained and deleted" in worker.output()
