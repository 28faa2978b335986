"""The session rules driven in memory, as the unit of work drives them on PostgreSQL: the same
``storage.rules.State`` loaded from plain dicts instead of locked rows, and a set for the
de-duplication ledger. The property tests check it against a reference model; the integration
tests check the real pipeline and sweep against it."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sessiond.events import Event
from storage import blocking, forced, rules
from storage.models import CONNECTED, DISCONNECTED
from storage.rows import Limits, Outcome, Session, batch_order


def new_user(user_id: str) -> dict[str, Any]:
    """A user row as ``INSERT INTO users`` leaves it (the columns the rules read and write)."""
    return {
        "id": user_id,
        "status": DISCONNECTED,
        "name": None,
        "email": None,
        "connected_at": None,
        "disconnected_at": None,
        "seen_at": None,
        "last_activity_at": None,
        "logged_out_at": None,
        "version": 0,
    }


@dataclass
class Memory:
    """Committed rows: users by id, sessions by (user, session id), row ids like ``BIGSERIAL``."""

    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    sessions: dict[tuple[str, str], Session] = field(default_factory=dict)
    ledger: set[str] = field(default_factory=set)
    audit: list[tuple[Any, ...]] = field(default_factory=list)
    outbox: list[tuple[str, str, str | None, str | None, datetime]] = field(default_factory=list)
    next_id: int = 1

    def load(self, user_ids: Sequence[str], *, create: bool = True) -> rules.State:
        """Every row of the users (a superset of what the loader locks: the rules read only the
        open sessions and the named ones), copied so a rolled-back unit leaves no trace."""
        state = rules.State()
        for uid in sorted(set(user_ids)):
            if uid not in self.users:
                if not create:
                    continue
                self.users[uid] = new_user(uid)
            state.users[uid] = copy.copy(self.users[uid])
            state.sessions[uid] = {
                sid: replace(s) for (u, sid), s in self.sessions.items() if u == uid
            }
        return state

    def save(self, state: rules.State) -> None:
        changed = [s for by_id in state.sessions.values() for s in by_id.values() if s.dirty]
        for s in sorted(changed, key=lambda s: s.order):
            key = (s.user_id, s.session_id)
            order = self.sessions[key].order if key in self.sessions else self._row_id()
            self.sessions[key] = replace(s, order=order, dirty=False)
        for uid, user in state.journal.users.items():
            self.users[uid] = copy.copy(user)
        self.audit += state.journal.audit
        self.outbox += state.journal.outbox

    def _row_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def apply_events(
        self, events: Sequence[Event], *, limits: Limits | None = None
    ) -> list[Outcome]:
        """``storage.commands.apply_events`` in memory: one unit for the batch."""
        state = self.load([ev.user_id for ev in events])
        order = batch_order(events)
        fresh = []
        for i in order:
            key = events[i].dedup_key()
            fresh.append(key not in self.ledger)
            self.ledger.add(key)
        outcomes = state.apply_batch(events, order, fresh, limits or Limits())
        self.save(state)
        return outcomes

    def force_disconnect(self, user_id: str, *, at: datetime) -> Outcome:
        state = self.load([user_id])
        out = forced.force_disconnect(state, user_id, at=at, reason="admin", source="admin")
        self.save(state)
        return out

    def revoke_session(self, user_id: str, session_id: str, *, at: datetime) -> Outcome:
        state = self.load([user_id])
        out = forced.revoke_session(
            state, user_id, session_id, at=at, reason="admin", source="admin"
        )
        self.save(state)
        return out

    def block(self, user_id: str, *, at: datetime) -> Outcome:
        state = self.load([user_id])
        out = blocking.block(state, user_id, at=at, reason=blocking.BLOCKED, source="admin")
        self.save(state)
        return out

    def unblock(self, user_id: str, *, at: datetime) -> Outcome:
        state = self.load([user_id])
        out = blocking.unblock(state, user_id, at=at, source="admin")
        self.save(state)
        return out

    def sweep(
        self, *, now: datetime, idle_timeout_s: int, session_max_s: int | None = None
    ) -> None:
        """``storage.expiry.sweep`` in memory, every user a candidate (no activity buffer)."""
        state = self.load(list(self.users), create=False)
        for uid in sorted(state.users):
            forced.expire_idle(state, uid, now=now, idle_timeout_s=idle_timeout_s)
        if session_max_s:
            for uid in sorted(state.users):
                forced.expire_lifetime(state, uid, now=now, session_max_s=session_max_s)
        self.save(state)

    def open_sessions(self) -> set[tuple[str, str]]:
        return {k for k, s in self.sessions.items() if s.status == CONNECTED}

    def connected_users(self) -> set[str]:
        return {uid for uid, u in self.users.items() if u["status"] == CONNECTED}
