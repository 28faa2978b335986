"""Reads of session state outside any unit of work: the cache-aside side and the lookups of the
admin routes. Nothing here locks or writes."""

from __future__ import annotations

from typing import Any

from tortoise.backends.base.client import BaseDBAsyncClient

from storage.cache import UserSnapshot
from storage.db import conn
from storage.models import CONNECTED
from storage.rows import to_snapshot


async def snapshot_of(db: BaseDBAsyncClient, user: dict[str, Any]) -> UserSnapshot:
    """The snapshot of a user row read by the caller, with its open sessions."""
    rows = await db.execute_query_dict(
        "SELECT session_id, started_at, last_seen_at FROM sessions"
        " WHERE user_id = $1 AND status = $2 ORDER BY started_at, id",
        [user["id"], CONNECTED],
    )
    opened = [(r["session_id"], r["started_at"], r["last_seen_at"]) for r in rows]
    return to_snapshot(user, opened)


async def find_session_owners(session_id: str) -> list[str]:
    """The users holding a session with this id (ids are unique per user only)."""
    rows = await conn().execute_query_dict(
        "SELECT DISTINCT user_id FROM sessions WHERE session_id = $1 ORDER BY user_id",
        [session_id],
    )
    return [str(r["user_id"]) for r in rows]


async def load_snapshot(user_id: str) -> UserSnapshot | None:
    """The PostgreSQL side of cache-aside: ``None`` for a user never seen."""
    db = conn()
    rows = await db.execute_query_dict("SELECT * FROM users WHERE id = $1", [user_id])
    if not rows:
        return None
    return await snapshot_of(db, rows[0])
