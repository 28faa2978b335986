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
"""

from __future__ import annotations

import logging
from typing import Any

from dramatiq.brokers.rabbitmq import RabbitmqBroker, _RabbitmqConsumer

log = logging.getLogger(__name__)

_OWNER = "_sessiond_consumer"


class ChannelBoundConsumer(_RabbitmqConsumer):  # type: ignore[misc]
    """A ``_RabbitmqConsumer`` whose acks and nacks ignore other channels' messages."""

    def __next__(self) -> Any:
        message = super().__next__()  # type: ignore[no-untyped-call]
        if message is not None:
            # MessageProxy forwards reads to the message; a plain attribute on the proxy is ours.
            object.__setattr__(message, _OWNER, self)
        return message

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
    """Dramatiq's RabbitMQ broker with channel-bound acknowledgements."""

    @property
    def consumer_class(self) -> type[ChannelBoundConsumer]:
        return ChannelBoundConsumer
