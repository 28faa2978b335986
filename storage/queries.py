"""Reads of session state outside any unit of work: the cache-aside side and the lookups of the
admin routes. Nothing here locks or writes."""

from __future__ import annotations

from typing import Any, Final

from tortoise.backends.base.client import BaseDBAsyncClient

from storage.cache import UserSnapshot
from storage.db import conn
from storage.models import CONNECTED
from storage.rows import to_snapshot

ADMIN_USER_FIELDS: Final = (
    "id, name, email, status, connected_at, disconnected_at, last_activity_at, seen_at, version,"
    " blocked_at, blocked_reason"
)
"""The columns the admin routes show of a user (never the fences or counters)."""
ADMIN_SESSION_FIELDS: Final = "session_id, status, started_at, ended_at, end_reason, ip_address"


async def snapshot_of(db: BaseDBAsyncClient, user: dict[str, Any]) -> UserSnapshot:
    """The snapshot of a user row read by the caller, with its open sessions."""
    rows = await db.execute_query_dict(
        "SELECT session_id, started_at FROM sessions WHERE user_id = $1 AND status = $2"
        " ORDER BY started_at, id",
        [user["id"], CONNECTED],
    )
    return to_snapshot(user, [(r["session_id"], r["started_at"]) for r in rows])


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


async def user_row(user_id: str) -> dict[str, Any] | None:
    """A user as the admin routes show it; ``None`` for a user never seen."""
    rows = await conn().execute_query_dict(
        f"SELECT {ADMIN_USER_FIELDS} FROM users WHERE id = $1", [user_id]
    )
    return rows[0] if rows else None


async def user_sessions(user_id: str) -> list[dict[str, Any]]:
    """Every session of a user, open or ended, oldest first."""
    return await conn().execute_query_dict(
        f"SELECT {ADMIN_SESSION_FIELDS} FROM sessions WHERE user_id = $1 ORDER BY started_at, id",
        [user_id],
    )


async def users_page(
    status: str | None, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """Up to ``limit`` users ordered by id, past ``after`` (keyset pagination), optionally of one
    status; with the cursor of the next page, ``None`` on the last one."""
    rows = await conn().execute_query_dict(
        f"SELECT {ADMIN_USER_FIELDS} FROM users"
        " WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR id > $2)"
        " ORDER BY id LIMIT $3",
        [status, after, limit + 1],
    )
    page = rows[:limit]
    return page, (str(page[-1]["id"]) if len(rows) > limit else None)
