"""AMQP connection parameters, TLS included, shared by workers, the CLI and the load tests."""

from __future__ import annotations

import ipaddress
import logging
import ssl
from typing import Any
from urllib.parse import unquote, urlsplit

import pika

from sessiond.config import Settings

log = logging.getLogger(__name__)

INGEST_QUEUE_ARGUMENTS: dict[str, Any] = {"x-single-active-consumer": True}
"""Both ingest queues (auth and Keycloak): one consumer at a time reads them, so the stamps given
to events without a time of their own follow queue order (``sessiond.stamps``)."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_context(settings: Settings) -> ssl.SSLContext:
    """Verifies the broker against the configured CA (or the system store) and its host name."""
    ctx = ssl.create_default_context(cafile=settings.amqp_ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.amqp_cert_file:
        ctx.load_cert_chain(settings.amqp_cert_file, settings.amqp_key_file)
    return ctx


def parameter_kwargs(settings: Settings, *, heartbeat: int = 60) -> dict[str, Any]:
    """Keyword arguments for ``pika.ConnectionParameters`` (Dramatiq takes them as a dict)."""
    url = urlsplit(settings.amqp_url)
    host = url.hostname or "127.0.0.1"
    tls = url.scheme == "amqps"
    vhost = unquote(url.path[1:]) if len(url.path) > 1 else "/"
    kwargs: dict[str, Any] = {
        "host": host,
        "port": url.port or (5671 if tls else 5672),
        "virtual_host": vhost,
        "credentials": pika.PlainCredentials(
            unquote(url.username or "guest"), unquote(url.password or "guest")
        ),
        "heartbeat": heartbeat,
        "blocked_connection_timeout": 60,
        "connection_attempts": 3,
        "retry_delay": 1.0,
    }
    if tls:
        kwargs["ssl_options"] = pika.SSLOptions(tls_context(settings), server_hostname=host)
    return kwargs


def connection_parameters(settings: Settings) -> pika.ConnectionParameters:
    return pika.ConnectionParameters(**parameter_kwargs(settings))


def warn_if_plaintext(settings: Settings) -> None:
    """Plain AMQP is fine on loopback; anywhere else credentials and events cross in clear text."""
    host = urlsplit(settings.amqp_url).hostname or ""
    if not settings.amqp_is_tls and not _is_loopback(host):
        log.warning(
            "AMQP without TLS to a non-loopback host; use amqps://",
            extra={"amqp_host": host},
        )


def declare_topology(channel: Any, settings: Settings) -> None:
    """The exchange and queue the auth service relies on (CONTRACT §1), plus the dead letters.

    Declared by every process that touches them, so the publisher loses nothing once sessiond has
    run once, whatever starts first.
    """
    channel.exchange_declare(settings.events_exchange, exchange_type="topic", durable=True)
    channel.queue_declare(settings.ingest_queue, durable=True, arguments=INGEST_QUEUE_ARGUMENTS)
    channel.queue_bind(settings.ingest_queue, settings.events_exchange, routing_key="#")
    declare_dead_letters(channel, settings)


def declare_dead_letters(channel: Any, settings: Settings) -> None:
    """``SESSIOND_DEAD_LETTER_QUEUE``, where every message no retry can apply ends up."""
    channel.queue_declare(settings.dead_letter_queue, durable=True)
