"""Acknowledgements that only ever reach the channel that delivered the message.

Dramatiq's RabbitMQ consumer checks a delivery tag against the tags of the consumer the worker
holds *now*. After a connection loss (a RabbitMQ restart) the consumer thread opens a new channel,
whose tags start again at 1, while the worker threads still finish the messages the old channel
delivered. Their acknowledgement then goes to the new channel with the old tag: when the new
channel has delivered that tag too, it acknowledges a different message, one still in the work
queue or waiting for its retry time. RabbitMQ forgets it; if the process dies (or the connection
drops again) before that message is applied, the event is lost without a trace: no state change,
no audit row, no dead letter, nothing left in any queue. The model checker found it (six lost
events in 30 minutes of faults; the log says ``Failed to ack message: not in known tags``).

Here each message remembers the consumer that delivered it, and a consumer acknowledges (or
rejects) only its own deliveries. A message of a closed channel is dropped from the
acknowledgement: RabbitMQ has already put it back in its queue when that channel closed, so it is
applied again (a duplicate, which the de-duplication ledger makes a no-op).

A message whose own channel is closed is not acknowledged on it either: Dramatiq would try the
ack, meet the dead connection and sleep 5 s in ``post_process_message`` before trying again, once
per message in hand, until the consumer thread has reconnected. A RabbitMQ restart held the
workers ~26 s that way while the new channel's deliveries (a logout among them) waited behind
(docs/reliability.md, "late, not lost"). Such an ack is dropped at once; the message itself is
still applied (during an outage of the broker alone that is the only way it is applied before the
broker is back), and its redelivery is then a duplicate.

A consumer that RabbitMQ has stopped serving is restarted (the stall watchdog, below). RabbitMQ
3.10's quorum queues can lose track of a consumer across a leader election (rabbitmq-server
#4304, #11228, #15473): the queue keeps messages ready, or checked out to a channel that never
received them, while the consumer waits forever on a healthy connection. Nothing is lost, but
nothing is applied either until that consumer reconnects: a node SIGKILLed mid-stream left one
partition's events waiting that way in 2 of 10 CI runs (docs/cluster.md, "A consumer the queue
forgot").
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pika.exceptions
from dramatiq.brokers.rabbitmq import RabbitmqBroker, _RabbitmqConsumer
from dramatiq.errors import ConnectionClosed

from actors.topology import queue_depth

log = logging.getLogger(__name__)

_OWNER = "_sessiond_consumer"


class ChannelBoundConsumer(_RabbitmqConsumer):  # type: ignore[misc]
    """A ``_RabbitmqConsumer`` whose acks and nacks ignore other channels' messages, and that
    restarts itself when its queue has messages ready that it is not given."""

    def __init__(self, broker: Any, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)  # type: ignore[no-untyped-call]
        self._stall_after = float(broker.stall_after_s)
        self._last_delivery = self._last_check = time.monotonic()
        self._suspect = False
        self._stalled = self._dropped = False

    def __next__(self) -> Any:
        message = super().__next__()  # type: ignore[no-untyped-call]
        if message is not None:
            # MessageProxy forwards reads to the message; a plain attribute on the proxy is ours.
            object.__setattr__(message, _OWNER, self)
            self._last_delivery = time.monotonic()
            self._suspect = False
            return message
        self._watch()
        return None

    def _watch(self) -> None:
        """Raise ``ConnectionClosed`` (Dramatiq's consumer thread then reconnects) when this
        consumer holds no message, has been given none for ``stall_after_s`` and its queue has
        had messages ready on two checks in a row: with credit to spare, RabbitMQ would have
        delivered them. Two checks, a second apart, so that a message published at the moment
        of the first is not taken for a stall."""
        now = time.monotonic()
        if not self._stall_after or self.known_tags:
            self._suspect = False
            return
        since = max(self._last_delivery, self._last_check)
        if not self._suspect and now - since < self._stall_after:
            return
        self._last_check = now
        ready = self._ready()
        if not ready:
            self._suspect = False
            return
        if not self._suspect:
            self._suspect = True
            return
        log.warning(
            "consumer stalled: its queue has messages ready but RabbitMQ delivers none; "
            "reconnecting",
            extra={
                "queue": self.queue_name,
                "ready": ready,
                "idle_s": round(now - self._last_delivery, 1),
            },
        )
        self._stalled = True
        raise ConnectionClosed(  # type: ignore[no-untyped-call]
            f"consumer of {self.queue_name} stalled with {ready} ready"
        )

    def _ready(self) -> int:
        """Messages ready in this consumer's queue, asked on a channel of its own (the
        consumer's channel may be the part of the broker that stopped answering). A quorum
        queue whose leader is unreachable answers 0: nothing to restart for."""
        try:
            return queue_depth(self.connection, self.queue_name)
        except pika.exceptions.AMQPChannelError:
            return 0
        except pika.exceptions.AMQPConnectionError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    def _nack(self, tag: int) -> None:
        # Also Dramatiq's path for a delivery it could not decode (``__next__`` then returns
        # None): a delivery all the same, so not a sign of a stall.
        self._last_delivery = time.monotonic()
        self._suspect = False
        super()._nack(tag)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Dramatiq's close, except after a stall: then the connection is dropped at once,
        because a graceful close waits for the very channel that stopped answering. No ack is
        pending then: the consumer held no message for ``stall_after_s``. Dramatiq may call
        this twice (a failed reconnect, a stop during the restart delay): there is nothing
        left to close the second time."""
        if self._dropped:
            return
        if not self._stalled:
            super().close()  # type: ignore[no-untyped-call]
            return
        self._dropped = True
        # pika's own way to drop a connection (its heartbeat timeout uses it); not public.
        try:
            self.connection._impl._terminate_stream(
                pika.exceptions.AMQPConnectionError(f"consumer of {self.queue_name} stalled")
            )
            self.connection.process_data_events(0)
        except Exception:  # the connection is gone, which is what was wanted
            log.debug("stalled consumer's connection dropped", exc_info=True)

    @property
    def open(self) -> bool:
        """Whether an ack can still reach RabbitMQ on this consumer's channel."""
        return bool(self.connection.is_open and self.channel.is_open)

    def _owns(self, message: Any, action: str) -> bool:
        """True when ``message`` is this consumer's delivery and its channel is still open."""
        if getattr(message, _OWNER, None) is self and self.open:
            return True
        log.warning(
            "stale delivery not acknowledged (its channel is closed); RabbitMQ redelivers it",
            extra={"action": action, "message_id": getattr(message, "message_id", None)},
        )
        return False

    def ack(self, message: Any) -> None:
        if self._owns(message, "ack"):
            super().ack(message)  # type: ignore[no-untyped-call]

    def nack(self, message: Any) -> None:
        if self._owns(message, "nack"):
            super().nack(message)  # type: ignore[no-untyped-call]


class ChannelBoundBroker(RabbitmqBroker):  # type: ignore[misc]
    """Dramatiq's RabbitMQ broker with channel-bound acknowledgements and the stall watchdog
    (``stall_after_s`` seconds; 0 = off)."""

    stall_after_s: float = 0.0

    @property
    def consumer_class(self) -> type[ChannelBoundConsumer]:
        return ChannelBoundConsumer
