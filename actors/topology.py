"""Queue names and declarations shared by the ingress, the actors and the CLI.

Partition queues are Dramatiq queues: they are declared with exactly the arguments Dramatiq uses
(dead-lettering to ``<queue>.XQ``), because RabbitMQ refuses a re-declaration with other arguments.
"""

from __future__ import annotations

from typing import Any

from sessiond.events import partition_queue

JOBS_QUEUE = "sessiond.jobs"


def dramatiq_queue_arguments(queue: str) -> dict[str, Any]:
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.XQ"}


def declare_dramatiq_queue(channel: Any, queue: str) -> None:
    channel.queue_declare(queue, durable=True, arguments=dramatiq_queue_arguments(queue))


def partition_queues(partitions: int) -> list[str]:
    return [partition_queue(i) for i in range(partitions)]


def actor_name(partition: int) -> str:
    return f"apply_events_p{partition}"
