"""Partition actors: one Dramatiq queue and actor per partition, each applying one event.

An actor's message is acknowledged only when it returns, i.e. after the PostgreSQL commit and the
Redis sync. Failures are retried with exponential backoff within a bounded budget (count and age);
past it, the original event goes to the dead-letter queue with its reason instead of vanishing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage

from actors import deadletter
from actors.runtime import Runtime
from actors.topology import JOBS_QUEUE, actor_name
from sessiond.events import Event, partition_queue
from storage import db, state

log = logging.getLogger(__name__)


async def apply_and_sync(runtime: Runtime, event: Event) -> state.Outcome:
    outcome = await state.apply_event(event)
    await state.publish_snapshot(runtime.require_cache(), outcome)
    return outcome


def _budget_spent(runtime: Runtime, message: Any) -> str | None:
    if message is None:
        return None
    retries = int(message.options.get("retries", 0))
    age_s = time.time() - message.message_timestamp / 1000
    if retries >= runtime.settings.retry_max:
        return f"retries_exhausted after {retries} retries"
    if age_s > runtime.settings.retry_max_age_s:
        return f"too_old after {age_s:.0f}s"
    return None


def _dead_letter(
    runtime: Runtime, broker: dramatiq.Broker, message: Any, raw: str, reason: str, detail: str
) -> None:
    props = deadletter.properties(
        reason=reason,
        detail=detail,
        source_queue=message.queue_name if message else "",
        exchange=runtime.settings.events_exchange,
        routing_key="replay",
        attempts=int(message.options.get("retries", 0)) + 1 if message else 1,
    )
    channel = broker.channel  # type: ignore[attr-defined]
    channel.queue_declare(runtime.settings.dead_letter_queue, durable=True)
    deadletter.publish(channel, runtime.settings, raw.encode("utf-8"), props)
    log.error("event dead-lettered", extra={"reason": reason, "detail": detail[:300]})


def process(runtime: Runtime, broker: dramatiq.Broker, wire: dict[str, Any], raw: str) -> None:
    message = CurrentMessage.get_current_message()
    try:
        event = Event.from_wire(wire)
    except (KeyError, TypeError, ValueError) as exc:
        _dead_letter(runtime, broker, message, raw, "undecodable", repr(exc))
        record_dead_letter_later(broker, "undecodable", repr(exc), message)
        return
    try:
        outcome = runtime.run(apply_and_sync(runtime, event))
    except Exception as exc:
        spent = _budget_spent(runtime, message)
        if spent is None:
            raise  # Dramatiq's Retries middleware schedules the next attempt with backoff
        reason = spent.split(" ", 1)[0]
        _dead_letter(runtime, broker, message, raw, reason, f"{spent}: {exc!r}")
        record_dead_letter_later(broker, reason, repr(exc), message, user_id=event.user_id)
        return
    log.debug(
        "event applied",
        extra={"user_id": event.user_id, "kind": event.kind, "result": outcome.reason},
    )


def record_dead_letter_later(
    broker: dramatiq.Broker, reason: str, detail: str, message: Any, *, user_id: str | None = None
) -> None:
    """Journals through the jobs queue: the database may be the very thing that is down."""
    broker.enqueue(
        dramatiq.Message(
            queue_name=JOBS_QUEUE,
            actor_name="record_dead_letter",
            args=(reason, detail[:1000], message.queue_name if message else "", user_id),
            kwargs={},
            options={},
        )
    )


def declare(runtime: Runtime, broker: dramatiq.Broker) -> list[dramatiq.Actor[Any, Any]]:
    """Registers one actor per partition plus the dead-letter journal actor."""
    settings = runtime.settings
    actors: list[dramatiq.Actor[Any, Any]] = []
    for index in range(settings.partitions):

        def apply_event(wire: dict[str, Any], raw: str) -> None:
            process(runtime, broker, wire, raw)

        actors.append(
            dramatiq.actor(
                actor_name=actor_name(index), queue_name=partition_queue(index), broker=broker
            )(apply_event)
        )

    def record_dead_letter(
        reason: str, detail: str, source_queue: str, user_id: str | None
    ) -> None:
        async def write() -> None:
            await state.audit(
                db.conn(),
                kind="dead_lettered",
                source="ingress",
                user_id=user_id,
                reason=reason,
                detail={"detail": detail, "queue": source_queue},
            )

        runtime.run(write())

    actors.append(
        dramatiq.actor(actor_name="record_dead_letter", queue_name=JOBS_QUEUE, broker=broker)(
            record_dead_letter
        )
    )
    return actors
