"""The Dramatiq broker every sessiond process uses: RabbitMQ with publisher confirms.

Built from the settings object so that TLS (``amqps://`` + CA) reaches Dramatiq's own connections
the same way it reaches the ingress and the CLI.
"""

from __future__ import annotations

from collections.abc import Callable

from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import (
    Callbacks,
    CurrentMessage,
    Pipelines,
    ShutdownNotifications,
    TimeLimit,
)

from actors.ingress import IngressMiddleware
from actors.retry import AgeLimit, BudgetRetries
from actors.runtime import Runtime, StorageMiddleware
from actors.sources import Source
from sessiond import amqp
from sessiond.config import Settings


def build_broker(
    settings: Settings, runtime: Runtime, sources: Callable[[], list[Source]]
) -> RabbitmqBroker:
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
        IngressMiddleware(settings, sources),
    ]
    return RabbitmqBroker(
        parameters=[amqp.parameter_kwargs(settings)],
        confirm_delivery=True,
        middleware=middleware,
    )
