"""Several node URLs and quorum queues against the real broker of the local stack."""

from __future__ import annotations

import socket
import uuid

import pika
import pytest

from sessiond import amqp
from sessiond.config import Settings

pytestmark = pytest.mark.integration


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: nothing listens there


def with_dead_node_first(settings: Settings) -> Settings:
    live = settings.amqp_urls[0]
    scheme, rest = live.split("://", 1)
    creds, path = rest.split("@", 1)[0], rest.split("/", 1)[1]
    dead = f"{scheme}://{creds}@127.0.0.1:{dead_port()}/{path}"
    return Settings(**{**settings.model_dump(), "amqp_url": f"{dead},{live}"})


def test_a_dead_first_node_is_skipped(settings: Settings) -> None:
    conn = pika.BlockingConnection(amqp.connection_parameters(with_dead_node_first(settings)))
    try:
        assert conn.is_open
    finally:
        conn.close()


def test_a_classic_queue_redeclared_as_quorum_names_the_migration(settings: Settings) -> None:
    queue = f"sessiond.test.classic.{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(amqp.connection_parameters(settings))
    try:
        amqp.declare_queue(conn.channel(), settings, queue)  # classic, as before an upgrade
        quorum = Settings(**{**settings.model_dump(), "queue_type": "quorum"})
        with pytest.raises(amqp.QueueTypeMismatch, match=r"docs/cluster\.md"):
            amqp.declare_queue(conn.channel(), quorum, queue)
    finally:
        if not conn.is_open:
            conn = pika.BlockingConnection(amqp.connection_parameters(settings))
        conn.channel().queue_delete(queue)
        conn.close()
