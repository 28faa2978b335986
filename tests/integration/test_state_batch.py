"""A batch applied in one transaction ends exactly where the same events applied one by one end:
same users, sessions, outbox events, and the same audit entries in each user's order."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import pytest

from sessiond.config import Settings
from sessiond.events import Event, decode_event
from storage import state
from storage.db import conn
from tests.conftest import truncate
from tests.integration.test_pipeline import scenario

pytestmark = pytest.mark.integration


async def tables() -> dict[str, list[dict[str, Any]]]:
    c = conn()
    return {
        "users": await c.execute_query_dict(
            "SELECT id, status, name, email, connected_at, disconnected_at, seen_at,"
            " logged_out_at, version FROM users ORDER BY id"
        ),
        "sessions": await c.execute_query_dict(
            "SELECT user_id, session_id, status, started_at, ended_at, end_reason, last_event_at"
            " FROM sessions ORDER BY user_id, session_id"
        ),
        "audit": await c.execute_query_dict(
            "SELECT user_id, session_id, kind, reason, occurred_at FROM audit_events ORDER BY id"
        ),
        "outbox": await c.execute_query_dict(
            "SELECT type, user_id, session_id, reason, occurred_at FROM outbox ORDER BY id"
        ),
    }


def per_user(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row["user_id"]].append(row)
    return dict(grouped)


async def test_batches_equal_one_by_one(db: Settings) -> None:
    raw, _ = scenario(100, 1500, seed=7)
    received = datetime.now(UTC)
    events: list[Event] = [decode_event(json.dumps(e).encode(), received_at=received) for e in raw]
    events = sorted(events, key=lambda e: e.user_id) + events[:50]  # arrival order + redeliveries

    for ev in events:
        await state.apply_event(ev)
    one_by_one = await tables()
    await truncate(db)
    for start in range(0, len(events), 37):
        await state.apply_events(events[start : start + 37])
    batched = await tables()

    assert len(one_by_one["users"]) == 100
    assert sum(u["status"] == "connected" for u in batched["users"]) > 0
    for name in ("users", "sessions", "outbox"):
        assert batched[name] == one_by_one[name], name
    assert per_user(batched["audit"]) == per_user(one_by_one["audit"])
    assert len(batched["audit"]) == len(one_by_one["audit"]) > 1000
