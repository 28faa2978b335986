"""A message finished after its channel was lost must not acknowledge another one.

Dramatiq's worker threads hand a finished message to the consumer thread's *current* consumer
(``ConsumerThread.post_process_message`` → ``self.consumer.ack``). After a connection loss that is
a new channel, whose delivery tags start again at 1: the old message's tag names a different
delivery there. This is what the model checker's lost events were (issue 11): the wrongly
acknowledged message was still in the worker's memory, the worker was SIGKILLed a few seconds
later, and RabbitMQ had nothing left to redeliver. Staged here step by step on the real broker,
with the same consumer calls the worker makes, so the interleaving is exact.
"""

from __future__ import annotations

import time
from typing import Any

import dramatiq
import pika
import pytest
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.errors import ConnectionClosed

from actors.consumer import ChannelBoundBroker
from sessiond import amqp
from sessiond.config import Settings
from tests.faults._support import next_delivery, pump


def _left(settings: Settings, queue: str) -> list[str]:
    """What RabbitMQ still holds for the queue, read back (and drained) by a plain client."""
    conn = pika.BlockingConnection(amqp.connection_parameters(settings))
    try:
        ch = conn.channel()
        names: list[str] = []
        while True:
            method, _props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return names
            names.append(dramatiq.Message.decode(body).args[0])
    finally:
        conn.close()


def stage(broker: RabbitmqBroker, settings: Settings, queue: str) -> list[str]:
    """X, A, B published; the first channel delivers X (tag 1) and A (tag 2) and acks X; the
    channel is lost (RabbitMQ puts A back first); the new channel delivers A again (tag 1) and B
    (tag 2); A's first delivery finishes and is acknowledged through the new consumer; then the
    process dies before it applied B. Returns what is left in the queue."""
    for name in ("X", "A", "B"):
        broker.enqueue(dramatiq.Message(queue, "apply", (name,), {}, {}))
    first = broker.consume(queue, prefetch=2, timeout=100)
    x, a = next_delivery(first), next_delivery(first)
    assert (x.args[0], a.args[0], a._tag) == ("X", "A", 2)
    first.ack(x)
    pump(first)
    first.close()  # the connection lost: A is unacknowledged, so RabbitMQ requeues it

    second = broker.consume(queue, prefetch=2, timeout=100)
    again, b = next_delivery(second), next_delivery(second)
    assert (again.args[0], again._tag, b.args[0], b._tag) == ("A", 1, "B", 2)
    second.ack(a)  # what post_process_message does with A's first delivery
    pump(second)
    second.close()  # SIGKILL before A and B were applied: RabbitMQ keeps what was not acked
    broker.close()
    return sorted(_left(settings, queue))


def test_stock_consumer_acknowledges_another_message(settings: Settings, queue: str) -> None:
    """The cause, on Dramatiq's own consumer: B is acknowledged by A's stale tag and lost."""
    broker = RabbitmqBroker(parameters=[amqp.parameter_kwargs(settings)], middleware=[])
    assert stage(broker, settings, queue) == ["A"]


def test_channel_bound_consumer_keeps_every_message(settings: Settings, queue: str) -> None:
    """sessiond's broker: the stale acknowledgement is dropped, A and B are both redelivered."""
    broker = ChannelBoundBroker(parameters=[amqp.parameter_kwargs(settings)], middleware=[])
    assert stage(broker, settings, queue) == ["A", "B"]


def test_a_closed_channels_ack_is_dropped_at_once(settings: Settings, queue: str) -> None:
    """A message in the worker's memory whose channel died: Dramatiq's consumer raises on its ack
    (``post_process_message`` then sleeps 5 s and tries again, per message in hand); sessiond's
    drops the ack at once, and RabbitMQ still holds the message for the new channel."""
    broker = ChannelBoundBroker(parameters=[amqp.parameter_kwargs(settings)], middleware=[])
    stock = RabbitmqBroker(parameters=[amqp.parameter_kwargs(settings)], middleware=[])
    try:
        broker.enqueue(dramatiq.Message(queue, "apply", ("A",), {}, {}))
        old: Any = stock.consume(queue, prefetch=1, timeout=100)
        a = next_delivery(old)
        old.connection.close()  # the connection lost under the worker
        with pytest.raises(ConnectionClosed):
            old.ack(a)
        bound: Any = broker.consume(queue, prefetch=1, timeout=100)
        a = next_delivery(bound)
        assert bound.open
        bound.connection.close()
        assert not bound.open
        started = time.monotonic()
        bound.ack(a)  # what post_process_message does: no exception, so no 5 s sleep
        assert time.monotonic() - started < 0.5
    finally:
        broker.close()
        stock.close()
    assert _left(settings, queue) == ["A"]  # RabbitMQ kept it for the new channel
