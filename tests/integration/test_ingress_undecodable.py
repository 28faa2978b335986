"""No decoder can stop a queue (issue 11): whatever a decoder raises dead-letters that message
(reason ``undecodable``, the exception in ``x-sessiond-detail``) and the batch goes on. The
ingress runs in this process against the real broker, with a decoder that has a bug."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import dramatiq
import pika
import pika.exceptions
import pytest
from dramatiq.asyncio import EventLoopThread

from actors import deadletter, stamping
from actors.ingress import Ingress
from actors.sources import Source
from actors.topology import partition_queues
from sessiond import amqp
from sessiond.config import Settings
from sessiond.events import Event, decode_event
from tests.conftest import Amqp, wait_until

pytestmark = pytest.mark.integration

QUEUE = "test.undecodable"


def buggy_decode(body: bytes, received_at: datetime, routing_key: str = "") -> Event:
    """A decoder with a bug no validation anticipated."""
    if b"boom" in body:
        raise RuntimeError("boom")
    return decode_event(body, received_at=received_at)


def declare(ch: Any) -> None:
    ch.queue_declare(QUEUE, durable=True, arguments=amqp.INGEST_QUEUE_ARGUMENTS)


@pytest.fixture
def ingress(
    settings: Settings, broker_client: Amqp, storage_loop: EventLoopThread
) -> Iterator[Ingress]:
    ch = broker_client.conn.channel()
    ch.queue_delete(QUEUE)
    ch.queue_delete(f"{QUEUE}.stamp")
    remember = stamping.on_loop(storage_loop.run_coroutine)
    thread = Ingress(settings, [Source(QUEUE, buggy_decode, declare, name="buggy")], remember)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()
        ch.queue_delete(QUEUE)
        ch.queue_delete(f"{QUEUE}.stamp")


def consumed(client: Amqp) -> bool:
    """The ingress has declared the queue and consumes it."""
    ch = client.conn.channel()
    try:
        return bool(ch.queue_declare(QUEUE, passive=True).method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return False
    finally:
        if ch.is_open:
            ch.close()


def forwarded_users(settings: Settings) -> list[str]:
    """The users of the events waiting in the partition queues (no worker consumes them here)."""
    users: list[str] = []
    conn = pika.BlockingConnection(amqp.connection_parameters(settings))
    try:
        ch = conn.channel()
        for queue in partition_queues(settings.partitions):
            while True:
                method, _props, body = ch.basic_get(queue, auto_ack=True)
                if method is None:
                    break
                message = dramatiq.Message.decode(body)
                users += [item["event"]["user_id"] for item in message.args[0]]
    finally:
        conn.close()
    return users


def test_a_decoder_bug_dead_letters_one_message_and_the_batch_goes_on(
    ingress: Ingress, broker_client: Amqp, settings: Settings
) -> None:
    wait_until(lambda: consumed(broker_client), timeout=30)
    # Given a good message, one the decoder crashes on, and another good one, in one batch
    ch = broker_client.conn.channel()
    ch.tx_select()
    for body in (
        {"event": "connected", "user_id": "before"},
        {"event": "connected", "user_id": "boom"},
        {"event": "connected", "user_id": "after"},
    ):
        ch.basic_publish("", QUEUE, json.dumps(body).encode())
    ch.tx_commit()
    # Then the crash dead-letters that message only, with the exception as its detail
    wait_until(lambda: broker_client.depth(settings.dead_letter_queue) >= 1, timeout=30)
    [letter] = list(deadletter.listing(settings, limit=10))
    assert letter.reason == "undecodable"
    assert "RuntimeError('boom')" in letter.detail
    assert letter.source_queue == QUEUE and b'"boom"' in letter.body
    assert letter.received_at  # it keeps the stamp it was given, for a replay
    # ... and the rest of the batch is forwarded (to their users' partitions)
    got: list[str] = []

    def both() -> bool:
        got.extend(forwarded_users(settings))
        return len(got) >= 2

    wait_until(both, timeout=30)
    assert sorted(got) == ["after", "before"]
    # ... and the queue keeps flowing
    ch.basic_publish("", QUEUE, json.dumps({"event": "connected", "user_id": "later"}).encode())
    ch.tx_commit()
    wait_until(lambda: forwarded_users(settings) == ["later"], timeout=30)
    assert ingress.is_alive()
    assert (ingress.forwarded, ingress.dead_lettered) == (3, 1)
