"""Block commands (CONTRACT §8): ``POST /admin/users/<id>/block`` and ``/unblock``, one unit of
work each; the rules are ``storage.blocking`` (Keycloak's delete/disable/enable come as events
through the same rules, ``State.apply``).

Redis key ``blocked:<id>`` (``blocked:{user:<id>}`` on a cluster, ``storage.keys``; no TTL)
mirrors a committed block for the API's cheap path: a disconnected user's token is refused
from Redis alone (``gone:<id>``), and this key tells ``blocked`` from ``not_connected`` there.
PostgreSQL stays the truth: the cache-miss path reads ``blocked_at``, and a refused login
re-mirrors a lost key (``actors.events``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from storage import blocking
from storage.keys import SINGLE, KeyLayout
from storage.redis_conn import REDIS_CONNECTION_ERRORS, AsyncClient, layout
from storage.rows import Outcome
from storage.unit_of_work import unit_of_work

log = logging.getLogger(__name__)

BLOCKED = blocking.BLOCKED


def blocked_key(user_id: str, keys: KeyLayout = SINGLE) -> str:
    return keys.blocked(user_id)


async def block_user(
    user_id: str, *, reason: str = BLOCKED, source: str, at: datetime | None = None
) -> Outcome:
    """Blocks the user (a user never seen too: their first login is then refused)."""
    async with unit_of_work() as work:
        await work.load([user_id])
        out = blocking.block(work, user_id, at=at or datetime.now(UTC), reason=reason,
                             source=source)  # fmt: skip
        out.snapshot = work.snapshot(user_id)
        return out


async def unblock_user(
    user_id: str, *, source: str, only_reason: str | None = None, at: datetime | None = None
) -> Outcome:
    """Lifts the block (only one of ``only_reason`` when given); ``applied`` is False when
    there was nothing to lift."""
    async with unit_of_work() as work:
        await work.load([user_id])
        out = blocking.unblock(work, user_id, at=at or datetime.now(UTC), source=source,
                               only_reason=only_reason)  # fmt: skip
        out.snapshot = work.snapshot(user_id)
        return out


async def is_blocked(client: AsyncClient, user_id: str) -> bool:
    return bool(await client.exists(blocked_key(user_id, layout(client))))


async def gone_reason(client: AsyncClient, user_id: str) -> str | None:
    """On a cache miss, in one round trip: ``blocked`` or ``not_connected`` when the newest change
    Redis saw disconnected the user (``gone:<id>``), told apart by ``blocked:<id>``; ``None`` when
    the user is not gone (PostgreSQL decides). Both keys share the user's slot on a cluster."""
    keys = layout(client)
    gone, blocked = await client.mget([keys.gone(user_id), keys.blocked(user_id)])
    if gone is None:
        return None
    return "blocked" if blocked is not None else "not_connected"


async def mirror(client: AsyncClient, outcome: Outcome) -> None:
    """After the commit: the ``blocked:<id>`` key follows the user's committed block. Best
    effort: without it a blocked user is still refused, as ``not_connected``."""
    snap = outcome.snapshot
    if snap is None:
        return
    key = blocked_key(outcome.user_id, layout(client))
    try:
        if snap.blocked:
            await client.set(key, "1")
        else:
            await client.delete(key)
    except (*REDIS_CONNECTION_ERRORS, OSError) as exc:
        log.warning(
            "blocked mirror not written", extra={"user_id": outcome.user_id, "error": repr(exc)}
        )
