"""AMQP connection parameters, TLS included, shared by workers, the CLI and the load tests.

``SESSIOND_AMQP_URL`` may name several nodes of a cluster, comma-separated: every connection
(pika's ``BlockingConnection`` given the list, Dramatiq's broker, the outbox relay) tries them in
turn, so that a dead node only costs a refused connect. ``SESSIOND_QUEUE_TYPE=quorum`` declares
every queue sessiond owns as a quorum queue (replicated over the cluster's nodes): all
declarations go through ``queue_arguments`` and ``declare_queue`` here.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions

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


def parameter_kwargs(
    settings: Settings, *, heartbeat: int = 60, url_text: str | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``pika.ConnectionParameters`` (Dramatiq takes them as a dict), for
    one node: ``url_text``, by default the first of ``SESSIOND_AMQP_URL``."""
    url = urlsplit(url_text or settings.amqp_urls[0])
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


def parameter_list(settings: Settings, *, heartbeat: int = 60) -> list[dict[str, Any]]:
    """One ``parameter_kwargs`` per node, in the configured order. Only the last node's
    ``connection_attempts`` count for pika (that many passes over the list), so every node but the
    last is tried once per pass: a dead node is skipped at once."""
    urls = settings.amqp_urls
    out = [parameter_kwargs(settings, heartbeat=heartbeat, url_text=u) for u in urls]
    for kwargs in out[:-1]:
        kwargs.update(connection_attempts=1, retry_delay=0.0)
    return out


def connection_parameters(settings: Settings) -> list[pika.ConnectionParameters]:
    """For ``pika.BlockingConnection``, which tries a list of parameters in turn."""
    return [pika.ConnectionParameters(**kw) for kw in parameter_list(settings)]


class QueueTypeMismatch(RuntimeError):
    """A queue exists with another ``x-queue-type`` than ``SESSIOND_QUEUE_TYPE`` asks for."""


MIGRATION_HINT = (
    "an existing queue cannot change type in place; drain it (stop the publishers' traffic or "
    "let the workers empty it), delete it and let sessiond redeclare it, or move its messages "
    "with a shovel: see docs/cluster.md, 'Classic to quorum queues'"
)


def queue_arguments(settings: Settings, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """``arguments`` plus the configured queue type: the one place that says what type every
    queue sessiond declares has (Dramatiq's own declarations included, ``actors.broker``)."""
    out = dict(arguments or {})
    if settings.queue_type == "quorum":
        out["x-queue-type"] = "quorum"
    return out


def explain_mismatch(queue: str, settings: Settings, exc: BaseException) -> BaseException:
    """``exc`` as a ``QueueTypeMismatch`` when RabbitMQ refused the declaration for its type."""
    text = str(exc)
    if "PRECONDITION_FAILED" in text and "x-queue-type" in text:
        return QueueTypeMismatch(
            f"queue {queue!r} exists with another type than SESSIOND_QUEUE_TYPE="
            f"{settings.queue_type} ({text}); {MIGRATION_HINT}"
        )
    return exc


def declare_queue(
    channel: Any, settings: Settings, queue: str, arguments: dict[str, Any] | None = None
) -> Any:
    """A durable queue of the configured type; a type clash says how to migrate."""
    try:
        return channel.queue_declare(
            queue, durable=True, arguments=queue_arguments(settings, arguments)
        )
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise explain_mismatch(queue, settings, exc) from exc


def warn_if_plaintext(settings: Settings) -> None:
    """Plain AMQP is fine on loopback; anywhere else credentials and events cross in clear text."""
    if settings.amqp_is_tls:
        return
    for url in settings.amqp_urls:
        host = urlsplit(url).hostname or ""
        if not _is_loopback(host):
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
    declare_queue(channel, settings, settings.ingest_queue, INGEST_QUEUE_ARGUMENTS)
    channel.queue_bind(settings.ingest_queue, settings.events_exchange, routing_key="#")
    declare_dead_letters(channel, settings)


def declare_dead_letters(channel: Any, settings: Settings) -> None:
    """``SESSIOND_DEAD_LETTER_QUEUE``, where every message no retry can apply ends up."""
    declare_queue(channel, settings, settings.dead_letter_queue)
