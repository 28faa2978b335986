"""Every Dramatiq message sessiond builds itself, typed, in one place.

Dramatiq's own ``actor.send`` needs the declared actor, which the ingress thread and the
scheduler do not hold; these constructors need nothing but their arguments, so pure code
(``actors.forwarding``) and tests can build them. The wire form (queue, actor name, argument
order, empty options) is what workers of an older release decode during a rolling deploy:
``tests/unit/test_messages.py`` pins it.
"""

from __future__ import annotations

from typing import Any, Final

import dramatiq
import pika

from actors.topology import JOBS_QUEUE, actor_name
from sessiond.events import partition_queue

RECORD_DEAD_LETTER: Final = "record_dead_letter"
"""The jobs-queue actor that journals a dead letter (``dead_lettered`` in ``audit_events``)."""

DETAIL_MAX: Final = 1000
"""Characters of a dead letter's detail that reach the journal (and its header)."""


def _message(
    queue: str, actor: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
) -> dramatiq.Message[Any]:
    return dramatiq.Message(
        queue_name=queue, actor_name=actor, args=args, kwargs=kwargs or {}, options={}
    )


def partition_batch(partition: int, items: list[dict[str, Any]]) -> dramatiq.Message[Any]:
    """One partition's share of an ingress batch, applied in one transaction."""
    return _message(partition_queue(partition), actor_name(partition), (items,))


def dead_letter_journal(
    reason: str, detail: str, source_queue: str, user_id: str | None = None
) -> dramatiq.Message[Any]:
    """Journals a dead letter through the jobs queue: the database may be the very thing that
    is down when the letter is written."""
    return _message(
        JOBS_QUEUE, RECORD_DEAD_LETTER, (reason, detail[:DETAIL_MAX], source_queue, user_id)
    )


_RETRY_OPTIONS: Final = frozenset({"retries", "traceback", "requeue_timestamp", "eta"})


def without_retries(message: Any) -> dramatiq.Message[Any]:
    """``message`` as it was first sent, without what its retries added (count, traceback,
    delay): a dead letter replayed from it starts with a full budget."""
    options = {k: v for k, v in message.options.items() if k not in _RETRY_OPTIONS}
    return dramatiq.Message(
        queue_name=message.queue_name,
        actor_name=message.actor_name,
        args=tuple(message.args),
        kwargs=dict(message.kwargs),
        options=options,
    )


def job_tick(job: str, scheduled_at: float) -> dramatiq.Message[Any]:
    """One tick of a periodic job (``actors.jobs``), as the scheduler enqueues it."""
    return _message(JOBS_QUEUE, job, (), {"scheduled_at": scheduled_at})


def publish(channel: Any, message: dramatiq.Message[Any]) -> None:
    """Puts ``message`` on its queue through ``channel`` (the ingress's transaction, or the
    broker's channel), as Dramatiq's own enqueue would: persistent, default exchange."""
    channel.basic_publish(
        exchange="",
        routing_key=message.queue_name,
        body=message.encode(),
        properties=pika.BasicProperties(delivery_mode=2),
    )
