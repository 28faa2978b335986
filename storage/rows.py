"""The rows a unit of work holds and what a change reports: plain data, shared by the rules
(``storage.rules``), the loader (``storage.unit_of_work``) and the commands (``storage.commands``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sessiond.config import Settings
from sessiond.events import Event
from storage.cache import UserSnapshot

IMPLICIT = ""
NEW_ROW = 1 << 62
EXPIRED = "expired"
EXPIRY_SOURCE = "expiry"
IDLE_REASON = "idle_timeout"
LIFETIME_REASON = "max_lifetime"


@dataclass(frozen=True, slots=True)
class Limits:
    """Session rules applied when a session starts; ``None`` means unlimited."""

    max_sessions_per_user: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        limit = settings.max_sessions_per_user
        return cls(max_sessions_per_user=limit if limit and limit > 0 else None)


@dataclass(slots=True)
class Outcome:
    """What one change did; ``applied`` is False for duplicates and stale events."""

    user_id: str
    applied: bool
    reason: str
    snapshot: UserSnapshot | None = None
    ended_sessions: list[str] = field(default_factory=list)
    started_sessions: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Session:
    """A session row held (locked) by a unit of work; ``order`` sorts like ``(id)`` does, new
    rows after loaded ones in creation order (they are inserted in that order)."""

    user_id: str
    session_id: str
    status: str
    started_at: datetime
    last_event_at: datetime
    order: int
    ended_at: datetime | None = None
    end_reason: str | None = None
    last_seen_at: datetime | None = None
    ip_address: str | None = None
    source: str = "auth"
    dirty: bool = False


OpenSession = tuple[str, datetime, datetime | None]
"""(session id, started at, last seen at) of an open session, as the snapshot needs it."""


def to_snapshot(user: dict[str, Any], open_sessions: Sequence[OpenSession]) -> UserSnapshot:
    """The cache's view of a user; a session's last sign of life is its start until a request
    or a newer login says otherwise (a row written before migration 0007 has no time yet)."""
    return UserSnapshot(
        user_id=user["id"],
        status=user["status"],
        version=user["version"],
        name=user["name"],
        email=user["email"],
        sessions=[sid for sid, _, _ in open_sessions],
        session_started={sid: started for sid, started, _ in open_sessions},
        session_seen={sid: seen or started for sid, started, seen in open_sessions},
        connected_at=user["connected_at"],
        seen_at=user["seen_at"],
        last_activity_at=user["last_activity_at"],
        logged_out_at=user["logged_out_at"],
        blocked=user.get("blocked_at") is not None,
    )


def touched(events: Sequence[Event]) -> list[tuple[str, str]]:
    """The (user, session) rows the events can read or write besides the open sessions."""
    pairs = {(ev.user_id, ev.session_id or IMPLICIT) for ev in events}
    pairs |= {(ev.user_id, IMPLICIT) for ev in events if ev.kind == "disconnected"}
    return sorted(pairs)


def batch_order(events: Sequence[Event]) -> list[int]:
    """The order a batch is applied in: by user, each user's events in arrival order."""
    return sorted(range(len(events)), key=lambda i: events[i].user_id)
