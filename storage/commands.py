"""The changes of session state, each one transaction: load and lock, the rules decide, save.

Callers (the event actors, the admin routes, the command line) sync ``Outcome.snapshot`` to Redis
after the commit (``publish_snapshot``); every change also wrote its audit entries and its
lifecycle events out in the same transaction (CONTRACT §5, §7).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sessiond.config import get_settings
from sessiond.events import Event
from storage import forced, journal
from storage.cache import Cache
from storage.db import conn
from storage.rows import Limits, Outcome, batch_order, touched
from storage.unit_of_work import unit_of_work


async def audit(
    *,
    kind: str,
    source: str,
    user_id: str | None,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """One audit entry outside any unit of work (e.g. a dead letter, whose event never applied)."""
    entry = journal.Journal()
    entry.record_audit(kind=kind, source=source, user_id=user_id, reason=reason, detail=detail)
    await entry.flush(conn())


async def apply_event(ev: Event, *, limits: Limits | None = None) -> Outcome:
    """Applies one event exactly once in effect; the caller syncs ``outcome.snapshot`` to Redis.

    ``limits`` defaults to the process settings (``SESSIOND_MAX_SESSIONS_PER_USER``)."""
    return (await apply_events([ev], limits=limits))[0]


async def apply_events(events: Sequence[Event], *, limits: Limits | None = None) -> list[Outcome]:
    """Applies a batch in ONE transaction (one commit, one WAL flush, a few round trips).

    Each user's events keep their arrival order. The outcomes come back in the events' order;
    only the last outcome of each user carries the snapshot to cache, the state after the whole
    batch. A failure rolls the whole batch back: retrying it is safe, every event being
    idempotent."""
    limits = limits or Limits.from_settings(get_settings())
    order = batch_order(events)
    async with unit_of_work() as work:
        await work.load([ev.user_id for ev in events], touched(events))
        fresh = await work.first_seen([events[i] for i in order])
        return work.apply_batch(events, order, fresh, limits)


async def force_disconnect(
    user_id: str, *, reason: str, source: str, at: datetime | None = None
) -> Outcome:
    """Ends all of a user's sessions as a ``disconnected`` event would (admin route, CLI)."""
    async with unit_of_work() as work:
        await work.load([user_id])
        return forced.force_disconnect(
            work, user_id, at=at or datetime.now(UTC), reason=reason, source=source
        )


async def revoke_session(
    user_id: str, session_id: str, *, reason: str, source: str, at: datetime | None = None
) -> Outcome:
    """Ends one session of a user (``DELETE /admin/sessions/<id>``); the user stays connected
    while another of their sessions is open. ``applied`` is False when it was not open."""
    async with unit_of_work() as work:
        await work.load([user_id])
        return forced.revoke_session(
            work, user_id, session_id, at=at or datetime.now(UTC), reason=reason, source=source
        )


async def publish_snapshot(cache: Cache, outcome: Outcome) -> None:
    """After commit, always (even for duplicates): a retry after a Redis failure heals the cache."""
    if outcome.snapshot is not None:
        await cache.sync(outcome.snapshot)
