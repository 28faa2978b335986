"""Fixtures for the session rules: a raw PostgreSQL connection (the outbox is emptied too: the
shared ``truncate`` does not know that table), a fixed clock, and the in-process API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def pg(orm_pg: asyncpg.Connection) -> asyncpg.Connection:
    """Here ``pg`` comes with Tortoise open: the state functions run in this process."""
    return orm_pg


async def outbox_rows(pg: asyncpg.Connection, user_id: str | None = None) -> list[dict[str, Any]]:
    """Events written so far, in publication order, as ``(type, user, session, reason)`` dicts."""
    rows = await pg.fetch(
        "SELECT type, user_id, session_id, reason, occurred_at FROM outbox"
        " WHERE $1::text IS NULL OR user_id = $1 ORDER BY id",
        user_id,
    )
    return [dict(r) for r in rows]


def kinds(rows: list[dict[str, Any]]) -> list[tuple[str, str | None, str | None]]:
    return [(r["type"], r["session_id"], r["reason"]) for r in rows]


from tests.api.conftest import api, api_factory  # noqa: E402, F401
