"""The retry rule, in one place: how often and how long a failing message is tried again, and
what happens past that.

A failure is retried with exponential backoff (``SESSIOND_RETRY_MIN_BACKOFF_MS`` …
``_MAX_BACKOFF_MS``) until its budget is spent: ``SESSIOND_RETRY_MAX`` retries or
``SESSIOND_RETRY_MAX_AGE_S`` since it was first enqueued. Past it, a message goes to the one
dead-letter queue (``actors.deadletter``) and is acknowledged: nothing is rejected to Dramatiq's
``<queue>.XQ`` queues, which exist only because Dramatiq declares them.

- Partition messages spend their budget in ``actors.events``, which dead-letters each failing
  event's original body (replayed, it goes back through its decoder); ``spent`` is the test.
- An actor may narrow the count with Dramatiq's own ``max_retries`` option: the dead-letter journal
  (``max_retries=None``) has no count limit, only the age, so that it outlives the outage that
  made the letter; past its age it is dead-lettered whole by ``BudgetRetries``.
- Periodic jobs (``max_retries=0``) are never retried nor dead-lettered: the next tick is the
  retry, and a tick too old to matter is dropped (``AgeLimit``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.middleware import AgeLimit as DramatiqAgeLimit
from dramatiq.middleware import Retries, SkipMessage

from actors import deadletter
from sessiond.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Spent:
    """Why a message's budget is spent: ``reason`` as the dead letter names it."""

    reason: str  # retries_exhausted | too_old
    detail: str  # e.g. "retries_exhausted after 12 retries"


def retries_of(message: Any) -> int:
    """How often ``message`` was retried before this attempt (0 the first time)."""
    return int(message.options.get("retries", 0)) if message is not None else 0


def count_limit(settings: Settings, broker: dramatiq.Broker, message: Any) -> int | None:
    """Retries allowed to ``message``'s actor: ``SESSIOND_RETRY_MAX`` unless the actor's
    ``max_retries`` says otherwise (``None``: no count limit, the age alone)."""
    options = broker.get_actor(message.actor_name).options
    limit: int | None = options.get("max_retries", settings.retry_max)
    return limit


def spent(settings: Settings, broker: dramatiq.Broker, message: Any) -> Spent | None:
    """The budget test, on the retries done before this attempt: the attempt that fails with
    the actor's ``count_limit`` of retries behind it is the last one."""
    if message is None:
        return None
    limit = count_limit(settings, broker, message)
    retries = retries_of(message)
    age_s = time.time() - message.message_timestamp / 1000
    if limit is not None and retries >= limit:
        return Spent("retries_exhausted", f"retries_exhausted after {retries} retries")
    if age_s > settings.retry_max_age_s:
        return Spent("too_old", f"too_old after {age_s:.0f}s")
    return None


class BudgetRetries(Retries):
    """Dramatiq's retry scheduling (backoff, re-enqueue with a delay), the budget's decision."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            max_retries=None,  # type: ignore[arg-type]  # the budget decides, never a count here
            min_backoff=settings.retry_min_backoff_ms,
            max_backoff=settings.retry_max_backoff_ms,
        )
        self.settings = settings

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            return
        if count_limit(self.settings, broker, message) == 0:
            log.warning(
                "job failed; the next tick runs it again",
                extra={"actor": message.actor_name, "error": repr(exception)[:300]},
            )
            return
        budget = spent(self.settings, broker, message)
        if budget is None:
            super().after_process_message(broker, message, result=result, exception=exception)  # type: ignore[no-untyped-call]
            return
        try:
            deadletter.bury_message(
                broker.channel,  # type: ignore[attr-defined]
                self.settings,
                message,
                budget.reason,
                f"{budget.detail}: {exception!r}",
            )
        except Exception:
            # The broker refused the letter too: rejected, RabbitMQ keeps it in ``<queue>.XQ``
            # rather than nobody having it.
            log.exception("dead letter not written; message rejected to its .XQ queue")
            message.fail()


class AgeLimit(DramatiqAgeLimit):
    """Dramatiq's ``max_age`` (the jobs set it), acknowledging what it drops: a tick too old to
    matter is superseded by the next one, not a dead letter (Dramatiq's own rejects it)."""

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        actor = broker.get_actor(message.actor_name)
        max_age = message.options.get("max_age") or actor.options.get("max_age", self.max_age)
        if max_age and time.time() * 1000 - message.message_timestamp >= max_age:
            log.warning(
                "job message too old; dropped",
                extra={"actor": message.actor_name, "message_id": message.message_id},
            )
            raise SkipMessage("message age limit exceeded")
