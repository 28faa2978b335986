"""The outbox relay in this process, on the real broker and database: what it publishes, that it
publishes each event once, keeps each user's order with several relays, and retries after a
failure without losing anything."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from actors.outbox import NackError, Publisher, Relay
from sessiond.config import Settings
from sessiond.events import Event
from storage import outbox as store
from storage import state
from tests.outbox.support import EventsOut

pytestmark = pytest.mark.integration

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def pg(orm_pg: asyncpg.Connection) -> asyncpg.Connection:
    return orm_pg


async def wait_for(
    consumer: EventsOut, count: int, timeout: float = 20.0
) -> list[dict[str, object]]:
    deadline = asyncio.get_running_loop().time() + timeout
    while len(bodies := await asyncio.to_thread(consumer.poll)) < count:
        assert asyncio.get_running_loop().time() < deadline, f"{len(bodies)} of {count} arrived"
        await asyncio.sleep(0.05)
    return bodies


async def login(user_id: str, session_id: str, at_s: float) -> None:
    await state.apply_event(
        Event(
            kind="connected",
            user_id=user_id,
            session_id=session_id,
            occurred_at=NOW + timedelta(seconds=at_s),
        )
    )


async def test_pending_events_are_published_once_with_the_contract_shape(
    pg: asyncpg.Connection, events_out: EventsOut, settings: Settings
) -> None:
    # Given a login and a logout committed
    await login("u1", "s1", 0)
    await state.apply_event(
        Event(kind="disconnected", user_id="u1", session_id="s1", occurred_at=NOW + timedelta(1))
    )
    relay = Relay(settings)
    try:
        # When the relay runs
        assert await relay.drain() == 3
        # Then each event arrives once, persistent, JSON, routed by its type, in commit order
        bodies = await wait_for(events_out, 3)
        assert [b["type"] for b in bodies] == [
            "session.started", "session.ended", "user.disconnected",
        ]  # fmt: skip
        assert bodies[1] == {
            "type": "session.ended",
            "event_id": bodies[1]["event_id"],
            "user_id": "u1",
            "session_id": "s1",
            "reason": "logout",
            "occurred_at": (NOW + timedelta(1)).isoformat(),
        }
        assert bodies[0]["reason"] is None and bodies[2]["session_id"] is None
        assert len({b["event_id"] for b in bodies}) == 3
        for body, routing_key, props in events_out.received:
            assert routing_key == body["type"] == props.type
            assert props.delivery_mode == 2
            assert props.content_type == "application/json"
            assert props.message_id == body["event_id"]
        # And they are marked sent: another round publishes nothing
        assert await relay.step() == 0
        assert await pg.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0
        await asyncio.sleep(0.3)
        assert len(events_out.poll()) == 3
    finally:
        await relay.stop()


async def test_several_relays_share_the_work_and_keep_each_users_order(
    pg: asyncpg.Connection, events_out: EventsOut, settings: Settings
) -> None:
    # Given 20 users with 15 session starts each, interleaved
    for i in range(15):
        for u in range(20):
            await login(f"u{u}", f"s{i:02d}", i)
    expected = {f"u{u}": [f"s{i:02d}" for i in range(15)] for u in range(20)}
    # When four relays with small batches drain the outbox at the same time
    small = settings.model_copy(update={"outbox_batch_size": 7})
    relays = [Relay(small) for _ in range(4)]
    try:
        counts = await asyncio.gather(*(r.drain() for r in relays))
        # Then every event went out exactly once, and each user's in commit order
        assert sum(counts) == 300
        bodies = await wait_for(events_out, 300)
        assert len({b["event_id"] for b in bodies}) == 300
        seen: dict[str, list[str]] = {}
        for b in bodies:
            seen.setdefault(str(b["user_id"]), []).append(str(b["session_id"]))
        assert seen == expected
        assert sum(1 for c in counts if c) > 1  # the work was really shared
    finally:
        for r in relays:
            await r.stop()


class FlakyPublisher(Publisher):
    """Loses the broker after ``fail_after`` messages, once."""

    def __init__(self, settings: Settings, fail_after: int) -> None:
        super().__init__(settings)
        self.fail_after = fail_after

    async def publish(self, rows: Sequence[store.OutboxRow]) -> None:
        if self.fail_after >= 0 and len(rows) > self.fail_after:
            await super().publish(rows[: self.fail_after])
            self.fail_after = -1
            raise ConnectionError("broker lost mid-batch")
        await super().publish(rows)


async def test_a_failed_batch_stays_pending_and_goes_out_again(
    pg: asyncpg.Connection, events_out: EventsOut, settings: Settings
) -> None:
    for i in range(10):
        await login("u1", f"s{i}", i)
    relay = Relay(settings, publisher=FlakyPublisher(settings, fail_after=4))
    try:
        # When the broker is lost after 4 of the 10 messages were confirmed
        with pytest.raises(ConnectionError):
            await relay.step()
        # Then nothing is marked sent...
        assert await pg.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 10
        # ... and the next round publishes all 10: at least once, the 4 twice (same event_id)
        assert await relay.drain() == 10
        bodies = await wait_for(events_out, 14)
        assert len(bodies) == 14 and len({b["event_id"] for b in bodies}) == 10
    finally:
        await relay.stop()


async def test_relay_loop_runs_until_stopped(
    pg: asyncpg.Connection, events_out: EventsOut, settings: Settings
) -> None:
    relay = Relay(settings.model_copy(update={"outbox_poll_s": 0.05}))
    await relay.start()
    try:
        # A change committed while the loop runs goes out on its own
        await login("u1", "s1", 0)
        bodies = await wait_for(events_out, 1)
        assert bodies[0]["type"] == "session.started"
    finally:
        await relay.stop()
    assert relay.published == 1


async def test_a_refused_message_fails_its_batch_and_stays_pending(
    pg: asyncpg.Connection, events_out: EventsOut, settings: Settings
) -> None:
    # Given a bound queue that the broker keeps at one message, refusing publishes beyond it
    full = "test.events-out.full"
    events_out.ch.queue_delete(full)
    events_out.ch.queue_declare(
        full, durable=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    events_out.ch.queue_bind(full, settings.events_out_exchange, routing_key="#")
    for i in range(3):
        await login("u1", f"s{i}", i)
    relay = Relay(settings)
    try:
        # When the relay publishes the three events, the broker nacks two of them
        with pytest.raises(NackError):
            await relay.step()
        # Then none is marked sent: the whole batch goes out again on a later round
        assert await pg.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 3
        events_out.ch.queue_delete(full)
        assert await relay.drain() == 3
        assert await pg.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0
    finally:
        events_out.ch.queue_delete(full)
        await relay.stop()


async def test_a_dead_first_node_is_skipped_by_the_relay(
    pg: asyncpg.Connection, events_out: EventsOut, settings: Settings
) -> None:
    # Given SESSIOND_AMQP_URL naming a node where nothing listens before the live one
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    live = settings.amqp_urls[0]
    scheme, rest = live.split("://", 1)
    creds, path = rest.split("@", 1)[0], rest.split("/", 1)[1]
    nodes = f"{scheme}://{creds}@127.0.0.1:{dead}/{path},{live}"
    relayed = Settings(**{**settings.model_dump(), "amqp_url": nodes})
    await login("u-dead-node", "s1", 0)
    relay = Relay(relayed)
    try:
        # When the relay runs, then it reached the live node and published
        assert await relay.drain() == 1
        assert [b["type"] for b in await wait_for(events_out, 1)] == ["session.started"]
    finally:
        await relay.stop()
