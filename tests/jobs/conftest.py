"""Fixtures for the periodic jobs: the activity buffer, a raw PostgreSQL connection and helpers
that put users in a known state at a known time (the clock is passed, never slept through)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from sessiond.events import Event
from storage import cache as cache_mod
from storage import state
from storage.activity import AccessLog, ActivityBuffer

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def buffer(cache: cache_mod.Cache) -> ActivityBuffer:
    return ActivityBuffer(cache.client)


@pytest.fixture
def access_log(cache: cache_mod.Cache) -> AccessLog:
    return AccessLog(cache.client)


@pytest.fixture
def pg(orm_pg: asyncpg.Connection) -> asyncpg.Connection:
    """Here ``pg`` comes with Tortoise open: the jobs run in this process."""
    return orm_pg


async def connect_user(
    cache: cache_mod.Cache, user_id: str, at: datetime, session_id: str | None = None
) -> state.Outcome:
    """Applies a ``connected`` event at ``at`` and caches the result, as a worker would."""
    outcome = await state.apply_event(
        Event(kind="connected", user_id=user_id, occurred_at=at, session_id=session_id)
    )
    await state.publish_snapshot(cache, outcome)
    return outcome


async def user_row(pg: asyncpg.Connection, user_id: str) -> dict[str, Any]:
    row = await pg.fetchrow("SELECT * FROM users WHERE id = $1", user_id)
    assert row is not None, user_id
    return dict(row)


# The in-process API of the API tests, for the end-to-end checks of what a request sees after a
# flush or a sweep (it opens the database itself: do not combine with the ``db`` fixture).
from tests.api.conftest import api, api_factory  # noqa: E402, F401
