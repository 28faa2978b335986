"""Blocking a user (CONTRACT §8): ``POST /admin/users/<id>/block``, Keycloak's disable and delete.

A block, in one unit of work of the state machine (``storage.state``): records ``blocked_at`` and
``blocked_reason`` on the user, ends every open session (reason: the block's), sets the token
fence (``logged_out_at``), journals ``blocked`` and writes the lifecycle events out. While the
user is blocked, every login is a no-op journaled ``refused_blocked`` (``UnitOfWork.connect``)
and the API answers 403 ``blocked``. An unblock clears the block; the fence stays, so tokens
issued before the block remain revoked.

Several sources may block the same user; the strongest reason is kept (``blocked`` by an
administrator > ``idp_user_deleted`` > ``idp_user_disabled``), and Keycloak re-enabling the user
lifts only a block of its own (``idp_user_disabled``), never an administrator's.

Redis key ``blocked:<id>`` (no TTL) mirrors the block for the API's cheap path: a disconnected
user's token is refused from Redis alone (``gone:<id>``), and this key tells ``blocked`` from
``not_connected`` there. PostgreSQL stays the truth (the cache-miss path reads ``blocked_at``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

import redis.asyncio as aioredis

from sessiond.events import Event
from storage.state import Outcome, unit_of_work

BLOCKED: Final = "blocked"
PRIORITY: Final = {"idp_user_disabled": 1, "idp_user_deleted": 2, BLOCKED: 3}

_SET_BLOCK = "UPDATE users SET blocked_at = $2, blocked_reason = $3 WHERE id = $1"


def blocked_key(user_id: str) -> str:
    return f"blocked:{user_id}"


def _stronger(current: str | None, reason: str) -> str:
    if current is not None and PRIORITY.get(current, 0) >= PRIORITY.get(reason, 0):
        return current
    return reason


async def block_user(
    user_id: str,
    *,
    reason: str = BLOCKED,
    source: str,
    at: datetime | None = None,
    event: Event | None = None,
) -> Outcome:
    """Blocks the user and ends all their sessions; ``event`` (a Keycloak admin event) is
    de-duplicated like any event, so a redelivery is a no-op."""
    when = at or datetime.now(UTC)
    out = Outcome(user_id=user_id, applied=True, reason="applied")
    async with unit_of_work() as work:
        await work.load([user_id])
        user = work.users[user_id]
        if event is not None and not (await work.first_seen([event]))[0]:
            out.applied, out.reason = False, "duplicate"
        else:
            kept = _stronger(user.get("blocked_reason"), reason)
            since = user.get("blocked_at") or when
            await work.db.execute_query(_SET_BLOCK, [user_id, since, kept])
            user["blocked_at"], user["blocked_reason"] = since, kept
            if user["logged_out_at"] is None or when > user["logged_out_at"]:
                user["logged_out_at"] = when
            work.journal.record_audit(
                kind="blocked", source=source, user_id=user_id, reason=reason, occurred_at=when
            )
            out.ended_sessions = work.end_sessions(
                user_id, at=when, reason=reason, source=source, kind="forced_disconnect",
                force=True,
            )  # fmt: skip
        work.settle(user_id, when, out.applied, reason=reason)
        out.snapshot = work.snapshot(user_id)
    return out


async def unblock_user(
    user_id: str,
    *,
    source: str,
    only_reason: str | None = None,
    at: datetime | None = None,
    event: Event | None = None,
) -> Outcome:
    """Lifts the block (only one of ``only_reason`` when given); ``applied`` is False when there
    was nothing to lift. Sessions do not come back: the user logs in again."""
    when = at or datetime.now(UTC)
    out = Outcome(user_id=user_id, applied=False, reason="not_blocked")
    async with unit_of_work() as work:
        await work.load([user_id])
        user = work.users[user_id]
        if event is not None and not (await work.first_seen([event]))[0]:
            out.reason = "duplicate"
        elif user.get("blocked_at") is not None and (
            only_reason is None or user.get("blocked_reason") == only_reason
        ):
            await work.db.execute_query(_SET_BLOCK, [user_id, None, None])
            user["blocked_at"], user["blocked_reason"] = None, None
            work.journal.record_audit(
                kind="unblocked", source=source, user_id=user_id, occurred_at=when
            )
            out.applied, out.reason = True, "applied"
        work.settle(user_id, when, out.applied)
        out.snapshot = work.snapshot(user_id)
    return out


async def is_blocked(client: aioredis.Redis, user_id: str) -> bool:
    return bool(await client.exists(blocked_key(user_id)))


async def mirror(client: aioredis.Redis, outcome: Outcome) -> None:
    """After the commit: the ``blocked:<id>`` key follows the user's committed block."""
    snap = outcome.snapshot
    if snap is None:
        return
    if snap.blocked:
        await client.set(blocked_key(outcome.user_id), "1")
    else:
        await client.delete(blocked_key(outcome.user_id))
