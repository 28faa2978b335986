"""The Dramatiq broker every sessiond process uses: RabbitMQ with publisher confirms.

Built from the settings object so that TLS (``amqps://`` + CA) reaches Dramatiq's own connections
the same way it reaches the ingress and the CLI.
"""

from __future__ import annotations

from collections.abc import Callable

from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from actors.consumer import Broker
from actors.ingress import IngressMiddleware
from actors.runtime import Runtime, StorageMiddleware
from actors.sources import Source
from sessiond import amqp
from sessiond.config import Settings


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
        Retries(
            max_retries=settings.retry_max + 1,
            min_backoff=settings.retry_min_backoff_ms,
            max_backoff=settings.retry_max_backoff_ms,
        ),
        CurrentMessage(),
        StorageMiddleware(runtime),
        IngressMiddleware(settings, sources),
    ]
    return Broker(
        parameters=[amqp.parameter_kwargs(settings)],
        confirm_delivery=True,
        middleware=middleware,
    )
