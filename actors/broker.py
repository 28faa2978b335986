"""The Dramatiq broker every sessiond process uses: RabbitMQ with publisher confirms.

Built from the settings object so that TLS (``amqps://`` + CA) reaches Dramatiq's own connections
the same way it reaches the ingress and the CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pika.exceptions
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL
from dramatiq.common import xq_name
from dramatiq.middleware import (
    Callbacks,
    CurrentMessage,
    Pipelines,
    ShutdownNotifications,
    TimeLimit,
)

from actors import stamping
from actors.consumer import ChannelBoundBroker
from actors.ingress import IngressMiddleware
from actors.retry import AgeLimit, BudgetRetries
from actors.runtime import Runtime, StorageMiddleware
from actors.sources import Source
from sessiond import amqp
from sessiond.config import Settings


class Broker(ChannelBoundBroker):
    """Dramatiq's RabbitMQ broker with sessiond's queue type: the partition, jobs, delay (``.DQ``)
    and dead-letter (``.XQ``) queues Dramatiq declares get ``amqp.queue_arguments`` like every
    queue sessiond declares itself. Dramatiq's own arguments (dead-lettering, the ``.XQ`` TTL)
    are all ones quorum queues accept; ``max_priority`` is not, and is never set."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self._settings = settings
        self.stall_after_s = settings.consumer_stall_s
        super().__init__(**kwargs)

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        base = super()._build_queue_arguments(queue_name)  # type: ignore[no-untyped-call]
        return amqp.queue_arguments(self._settings, base)

    def _declare_queue(self, queue_name: str) -> Any:
        try:
            return super()._declare_queue(queue_name)  # type: ignore[no-untyped-call]
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise amqp.explain_mismatch(queue_name, self._settings, exc) from exc

    def _declare_xq_queue(self, queue_name: str) -> Any:
        # Dramatiq's own declaration, with the queue type: the TTL has to stay a static value
        # (messages expire head-first).
        arguments = amqp.queue_arguments(self._settings, {"x-message-ttl": DEAD_MESSAGE_TTL})
        return self.channel.queue_declare(
            queue=xq_name(queue_name), durable=True, arguments=arguments
        )


def build_broker(
    settings: Settings, runtime: Runtime, sources: Callable[[], list[Source]]
) -> Broker:
    amqp.warn_if_plaintext(settings)
    middleware = [
        AgeLimit(),
        TimeLimit(time_limit=60_000),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        BudgetRetries(settings),  # the retry rule and what happens past it: actors.retry
        CurrentMessage(),
        StorageMiddleware(runtime),
        IngressMiddleware(settings, sources, stamping.on_loop(runtime.run)),
    ]
    return Broker(
        settings,
        parameters=amqp.parameter_list(settings),
        confirm_delivery=True,
        middleware=middleware,
    )
