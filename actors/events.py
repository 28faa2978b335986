"""Partition actors: one Dramatiq queue and actor per partition, each applying one event.

An actor's message is acknowledged only when it returns, i.e. after the PostgreSQL commit and the
Redis sync. Failures are retried with exponential backoff within a bounded budget (the rule is
``actors.retry``); past it, the original event goes to the dead-letter queue with its reason
instead of vanishing.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage

from actors import deadletter, messages, retry
from actors.messages import RECORD_DEAD_LETTER
from actors.runtime import Runtime
from actors.topology import JOBS_QUEUE, actor_name
from sessiond.events import Event, partition_queue
from storage import block, revocation, state
from storage.activity import ActivityBuffer

log = logging.getLogger(__name__)


ISOLATE_AFTER = 2
"""Retries of a batch in one transaction before its events are applied one by one, so that an
event that cannot be applied holds back, and finally dead-letters, only itself."""


EXPANDED_CHUNK = 1000
"""Users per transaction when one revocation names many (a Keycloak ``logout-all``)."""


async def apply_and_sync(runtime: Runtime, events: list[Event]) -> list[state.Outcome]:
    """One transaction for the batch, then the users' final snapshots to Redis, concurrently.

    Revocations that name no user are expanded first (``storage.revocation``; a Keycloak
    ``logout-all`` may name thousands, applied ``EXPANDED_CHUNK`` users per transaction);
    activity events (Keycloak token refreshes) only touch the activity buffer, like a granted
    request; the ``blocked:<id>`` mirror follows the users a block or unblock touched."""
    cache = runtime.require_cache()
    expanded = await revocation.expand(events)
    touches = [ev for ev in expanded if ev.kind == "activity"]
    if touches:
        buffer = ActivityBuffer(cache.client)
        for ev in touches:
            await buffer.touch(ev.user_id, ev.occurred_at.timestamp(), session_id=ev.session_id)
    changes = [ev for ev in expanded if ev.kind != "activity"]
    blocks = {ev.user_id for ev in changes if ev.kind in ("blocked", "unblocked")}
    chunk = max(len(changes) if len(changes) == len(events) else EXPANDED_CHUNK, 1)
    outcomes: list[state.Outcome] = []
    for start in range(0, len(changes), chunk):
        done = await state.apply_events(changes[start : start + chunk])
        # The mirror before the eviction: the first refusal a blocked user sees already says
        # ``blocked``. It also heals a lost mirror when a blocked user's login is refused.
        for outcome in done:
            snap = outcome.snapshot
            if snap is not None and (snap.blocked or outcome.user_id in blocks):
                await block.mirror(cache.client, outcome)
        await cache.sync_many([o.snapshot for o in done if o.snapshot])
        outcomes += done
    return outcomes


def _dead_letter(
    runtime: Runtime,
    broker: dramatiq.Broker,
    message: Any,
    item: dict[str, Any],
    reason: str,
    detail: str,
) -> None:
    """The original body, with the exchange and routing key it was published with and the
    stamps the ingress gave it, so that ``sessiond dlq replay`` sends it back through the same
    decoder at the same time."""
    source_queue = message.queue_name if message else ""
    props = deadletter.properties(
        reason=reason,
        detail=detail,
        source_queue=source_queue,
        exchange=str(item.get("exchange") or runtime.settings.events_exchange),
        routing_key=str(item.get("routing_key") or "replay"),
        attempts=retry.retries_of(message) + 1,
        received_at=str(item.get("received_at") or "") or None,
        stamped_at=str(item.get("stamped_at") or "") or None,
    )
    user_id = item.get("event", {}).get("user_id") if isinstance(item.get("event"), dict) else None
    journal = messages.dead_letter_journal(reason, detail, source_queue, user_id)
    raw = str(item.get("raw", "")).encode("utf-8")
    deadletter.bury(broker.channel, runtime.settings, raw, props, journal)  # type: ignore[attr-defined]
    log.error("event dead-lettered", extra={"reason": reason, "detail": detail[:300]})


def process(runtime: Runtime, broker: dramatiq.Broker, items: list[dict[str, Any]]) -> None:
    """Applies a partition's batch; acknowledged (by returning) only after the commit."""
    message = CurrentMessage.get_current_message()
    good: list[tuple[Event, dict[str, Any]]] = []
    for item in items:
        try:
            good.append((Event.from_wire(item["event"]), item))
        except (KeyError, TypeError, ValueError) as exc:
            _dead_letter(runtime, broker, message, item, "undecodable", repr(exc))
    if not good:
        return
    retries = retry.retries_of(message)
    if retries < ISOLATE_AFTER:
        try:
            runtime.run(apply_and_sync(runtime, [event for event, _ in good]))
            return
        except Exception:
            budget_left = retry.spent(runtime.settings, broker, message) is None
            if budget_left and retries + 1 < ISOLATE_AFTER:
                raise  # actors.retry schedules the next attempt with backoff
            log.warning("batch failed; applying its events one by one", exc_info=True)
    failed: list[tuple[dict[str, Any], Exception]] = []
    for event, item in good:
        try:
            runtime.run(apply_and_sync(runtime, [event]))
        except Exception as exc:
            failed.append((item, exc))
    if not failed:
        return
    spent = retry.spent(runtime.settings, broker, message)
    if spent is None:
        raise failed[0][1]  # retried whole: the events applied meanwhile are duplicates, no-ops
    for item, error in failed:
        _dead_letter(runtime, broker, message, item, spent.reason, f"{spent.detail}: {error!r}")


def declare(runtime: Runtime, broker: dramatiq.Broker) -> list[dramatiq.Actor[Any, Any]]:
    """Registers one actor per partition plus the dead-letter journal actor."""
    settings = runtime.settings
    actors: list[dramatiq.Actor[Any, Any]] = []
    for index in range(settings.partitions):

        def apply_events(items: list[dict[str, Any]]) -> None:
            process(runtime, broker, items)

        actors.append(
            dramatiq.actor(
                actor_name=actor_name(index), queue_name=partition_queue(index), broker=broker
            )(apply_events)
        )

    def record_dead_letter(
        reason: str, detail: str, source_queue: str, user_id: str | None
    ) -> None:
        async def write() -> None:
            await state.audit(
                kind="dead_lettered",
                source="ingress",
                user_id=user_id,
                reason=reason,
                detail={"detail": detail, "queue": source_queue},
            )

        runtime.run(write())

    actors.append(
        # No count limit, only the age budget: the journal outlives the outage that made the
        # letter (``actors.retry``).
        dramatiq.actor(
            actor_name=RECORD_DEAD_LETTER, queue_name=JOBS_QUEUE, broker=broker, max_retries=None
        )(record_dead_letter)
    )
    return actors
