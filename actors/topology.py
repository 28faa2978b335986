"""Queue names and declarations shared by the ingress, the actors and the CLI.

Partition queues are Dramatiq queues: they are declared with exactly the arguments Dramatiq uses
(dead-lettering to ``<queue>.XQ``), because RabbitMQ refuses a re-declaration with other arguments.

The ingest queues have a single active consumer, an argument RabbitMQ cannot add to an existing
queue. Their names are therefore versioned (``sessiond.ingest.v2``, ``sessiond.keycloak.v2``):
a queue of the name without ``.v2`` is a legacy one, which the ingress unbinds, drains alone
(exclusive consumer) into the partitions and deletes before it reads the new queue, so that the
backlog keeps its order ahead of what came after.

Each ingest queue has a companion ``<queue>.stamp`` (at most one message): the newest stamp its
active consumer gave, written in the same AMQP transaction as the batch it stamped, so that the
next active consumer starts above it (``sessiond.stamps``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pika
import pika.exceptions

from sessiond import amqp
from sessiond.config import Settings
from sessiond.events import partition_queue
from sessiond.stamps import parse_stamp

JOBS_QUEUE = "sessiond.jobs"
VERSION_SUFFIX = ".v2"
STAMP_QUEUE_ARGUMENTS: dict[str, Any] = {"x-max-length": 1}  # overflow drops the older head


def dramatiq_queue_arguments(queue: str) -> dict[str, Any]:
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.XQ"}


def declare_dramatiq_queue(channel: Any, settings: Settings, queue: str) -> None:
    amqp.declare_queue(channel, settings, queue, dramatiq_queue_arguments(queue))


def partition_queues(partitions: int) -> list[str]:
    return [partition_queue(i) for i in range(partitions)]


def actor_name(partition: int) -> str:
    return f"apply_events_p{partition}"


def legacy_queue(queue: str) -> str | None:
    """The queue an older release read instead of ``queue`` (``x.v2`` → ``x``), if any."""
    if queue.endswith(VERSION_SUFFIX) and len(queue) > len(VERSION_SUFFIX):
        return queue[: -len(VERSION_SUFFIX)]
    return None


def stamp_queue(queue: str) -> str:
    return f"{queue}.stamp"


def declare_stamp_queue(channel: Any, settings: Settings, queue: str) -> None:
    amqp.declare_queue(channel, settings, stamp_queue(queue), STAMP_QUEUE_ARGUMENTS)


def read_high_water(channel: Any, queue: str) -> tuple[datetime | None, int | None]:
    """The last active consumer's newest stamp, and the delivery tag to acknowledge with the next
    batch (the message stays in the queue until a newer stamp is committed)."""
    method, _props, body = channel.basic_get(stamp_queue(queue), auto_ack=False)
    if method is None:
        return None, None
    return parse_stamp(body), int(method.delivery_tag)


def write_high_water(channel: Any, queue: str, stamp: datetime) -> None:
    channel.basic_publish(
        exchange="",
        routing_key=stamp_queue(queue),
        body=stamp.isoformat().encode(),
        properties=pika.BasicProperties(delivery_mode=2),
    )


def queue_exists(conn: pika.BlockingConnection, queue: str) -> bool:
    """Asked on a channel of its own: a 404 closes the channel it is asked on."""
    probe = conn.channel()
    try:
        probe.queue_declare(queue, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return False
        raise
    finally:
        if probe.is_open:
            probe.close()


def queue_depth(conn: pika.BlockingConnection, queue: str) -> int:
    probe = conn.channel()
    try:
        return int(probe.queue_declare(queue, passive=True).method.message_count)
    finally:
        if probe.is_open:
            probe.close()
