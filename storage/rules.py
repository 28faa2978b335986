"""The session rules, as pure code over rows already locked: the one state machine.

Every writer of session state (the event actors, the admin routes, the expiry sweep) loads and
locks its rows (``storage.unit_of_work``), lets a ``State`` decide here, and saves what changed.
Nothing in this module reads or writes a server, so the rules are tested in memory
(``tests/unit/test_rules_model.py``) and no SQL restates them.

Ordering safety comes from the data, never from the queue (CONTRACT §1):
- each session remembers the time of the newest event applied to it (``last_event_at``); a
  ``connected`` applies only when strictly newer, a ``disconnected`` when at least as new, so on a
  tie the safer answer (refuse) wins;
- a ``disconnected`` without session id ends every session that began before it and records
  ``logged_out_at`` on the user, which fences off older ``connected`` events of any session;
- a ``disconnected`` for a session never seen leaves an ended row (a tombstone) behind, so the
  late ``connected`` it overtook is recognised as stale.

Decisions that are not events end sessions by force: whatever event order says, and their
ordering fence moves to the newest of the two times. A limit is decided here: with
``SESSIOND_MAX_SESSIONS_PER_USER``, a session that starts beyond the limit ends the user's oldest
open sessions (reason ``session_limit``). An administrator's and the clock's decisions are
``storage.forced``, blocks ``storage.blocking``; all of them work on this module's ``State``.
Each change records its audit entries and lifecycle events out (CONTRACT §5, §7) in the
``Journal`` the caller writes in the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sessiond.events import Event
from storage import blocking, outbox
from storage.cache import UserSnapshot
from storage.journal import Journal
from storage.models import CONNECTED, DISCONNECTED, ENDED
from storage.rows import IMPLICIT, NEW_ROW, Limits, Outcome, Session, to_snapshot


class State:
    """The locked user rows (dicts of their columns) and session rows of one transaction, and
    the rules that change them. ``users`` and ``sessions`` are filled by the loader; every
    changed user lands in ``journal.users``, every changed session has ``dirty`` set."""

    def __init__(self, journal: Journal | None = None) -> None:
        self.journal = journal if journal is not None else Journal()
        self.users: dict[str, dict[str, Any]] = {}
        self.sessions: dict[str, dict[str, Session]] = {}
        self._created = 0

    def _new_session(self, ev: Event, sid: str, status: str) -> Session:
        self._created += 1
        row = Session(
            user_id=ev.user_id,
            session_id=sid,
            status=status,
            started_at=ev.occurred_at,
            last_event_at=ev.occurred_at,
            order=NEW_ROW + self._created,
            ip_address=ev.ip_address,
            source=ev.source,
            dirty=True,
        )
        if status == ENDED:  # a tombstone
            row.ended_at, row.end_reason, row.ip_address = ev.occurred_at, "logout", None
        self.sessions[ev.user_id][sid] = row
        return row

    def open_sessions(self, user_id: str) -> list[Session]:
        rows = [s for s in self.sessions[user_id].values() if s.status == CONNECTED]
        return sorted(rows, key=lambda s: (s.started_at, s.order))

    def snapshot(self, user_id: str) -> UserSnapshot:
        opened = [(s.session_id, s.started_at) for s in self.open_sessions(user_id)]
        return to_snapshot(self.users[user_id], opened)

    def end_sessions(
        self,
        user_id: str,
        *,
        at: datetime,
        reason: str,
        source: str,
        session_ids: Sequence[str] | None = None,
        kind: str = "disconnected",
        force: bool = False,
        detail: Callable[[Session], dict[str, Any] | None] | None = None,
    ) -> list[str]:
        """Ends open sessions (all, or the named ones) not newer than ``at``; journals each one
        and writes its ``session.ended``. ``force`` ends them even when an event newer than
        ``at`` was applied to them (a rule or an admin decides, not the event order); their
        ordering fence stays at the newest of the two times."""
        ended = [
            s
            for s in self.open_sessions(user_id)
            if (force or s.last_event_at <= at)
            and (session_ids is None or s.session_id in session_ids)
        ]
        for s in ended:
            s.status, s.ended_at, s.end_reason = ENDED, at, reason
            s.last_event_at = max(s.last_event_at, at)
            s.dirty = True
        sids = [s.session_id for s in ended]
        self.journal.record_outbox(
            outbox.SESSION_ENDED, user_id=user_id, session_ids=sids, reason=reason, occurred_at=at
        )
        for s in ended:
            self.journal.record_audit(
                kind=kind, source=source, user_id=user_id, session_id=s.session_id or None,
                reason=reason, occurred_at=at, detail=detail(s) if detail else None,
            )  # fmt: skip
        return sids

    def settle(
        self, user_id: str, at: datetime, changed: bool, *, reason: str | None = None
    ) -> dict[str, Any]:
        """Derives the user's status from their sessions and bumps the version when anything
        changed; a user going from connected to disconnected emits ``user.disconnected``."""
        user = self.users[user_id]
        is_open = any(s.status == CONNECTED for s in self.sessions[user_id].values())
        status = CONNECTED if is_open else DISCONNECTED
        if status != user["status"]:
            changed = True
            if status == CONNECTED:
                user["connected_at"] = at
                user["seen_at"] = at
            else:
                user["disconnected_at"] = at
                self.journal.record_outbox(
                    outbox.USER_DISCONNECTED, user_id=user_id, reason=reason, occurred_at=at
                )
            user["status"] = status
        if changed:
            user["version"] += 1
            self.journal.users[user_id] = user
        return user

    # -- events

    def connect(self, ev: Event, out: Outcome, limits: Limits) -> bool:
        user = self.users[ev.user_id]
        sid = ev.session_id or IMPLICIT
        at = ev.occurred_at
        if user.get("blocked_at") is not None:  # no login while blocked (``block``)
            out.reason = "refused_blocked"
            return False
        if user["logged_out_at"] is not None and at <= user["logged_out_at"]:
            out.reason = "stale"
            return False
        row = self.sessions[ev.user_id].get(sid)
        if row is not None and at <= row.last_event_at:
            out.reason = "stale"
            return False
        was_open = row is not None and row.status == CONNECTED
        if row is None:
            row = self._new_session(ev, sid, CONNECTED)
        else:
            if not was_open:
                row.started_at = at
            row.status, row.last_event_at, row.ended_at, row.end_reason = CONNECTED, at, None, None
            row.ip_address = ev.ip_address or row.ip_address
            row.dirty = True
        if ev.name is not None:
            user["name"] = ev.name
        if ev.email is not None:
            user["email"] = ev.email
        if user["status"] == CONNECTED:
            user["seen_at"] = max(filter(None, [user["seen_at"], at]))
        if not was_open:
            out.started_sessions.append(sid)
            self.journal.record_audit(
                kind="connected",
                source=ev.source,
                user_id=ev.user_id,
                session_id=sid or None,
                occurred_at=at,
                detail={"ip": ev.ip_address} if ev.ip_address else None,
            )
            self.journal.record_outbox(
                outbox.SESSION_STARTED, user_id=ev.user_id, session_ids=[sid], occurred_at=at
            )
            if limits.max_sessions_per_user is not None:
                out.ended_sessions += self._enforce_limit(
                    ev, sid, limit=limits.max_sessions_per_user
                )
        out.reason = "applied"
        return True

    def _enforce_limit(self, ev: Event, new_sid: str, *, limit: int) -> list[str]:
        """Ends the oldest open sessions beyond ``limit``; the one just started always stays."""
        others = [s for s in self.open_sessions(ev.user_id) if s.session_id != new_sid]
        keep = max(limit - 1, 0)
        oldest = others[: max(len(others) - keep, 0)]
        if not oldest:
            return []
        return self.end_sessions(
            ev.user_id, at=ev.occurred_at, reason="session_limit", source=ev.source,
            session_ids=[s.session_id for s in oldest], force=True,
        )  # fmt: skip

    def disconnect(self, ev: Event, out: Outcome) -> bool:
        user = self.users[ev.user_id]
        at = ev.occurred_at
        out.reason = "applied"
        if ev.session_id is None:
            if user["logged_out_at"] is None or at > user["logged_out_at"]:
                user["logged_out_at"] = at
            out.ended_sessions = self.end_sessions(
                ev.user_id, at=at, reason=ev.reason or "logout", source=ev.source
            )
            # The implicit session's tombstone keeps its own ordering fence as well.
            self._fence(ev, IMPLICIT)
            return True
        row = self.sessions[ev.user_id].get(ev.session_id)
        if row is None:
            self._new_session(ev, ev.session_id, ENDED)  # a tombstone: fences the late connect
            return True
        if at < row.last_event_at:
            out.reason = "stale"
            return False
        out.ended_sessions = self.end_sessions(
            ev.user_id,
            at=at,
            reason=ev.reason or "logout",
            source=ev.source,
            session_ids=[ev.session_id],
        )
        if not out.ended_sessions:
            self._fence(ev, ev.session_id)
        return True

    def _fence(self, ev: Event, sid: str) -> None:
        row = self.sessions[ev.user_id].get(sid)
        if row is None:
            self._new_session(ev, sid, ENDED)
        elif ev.occurred_at > row.last_event_at:
            row.last_event_at = ev.occurred_at
            row.dirty = True

    def apply(self, ev: Event, first_seen: bool, limits: Limits) -> Outcome:
        """One event, ``first_seen`` as the de-duplication ledger says; journals why it was
        ignored when it was."""
        out = Outcome(user_id=ev.user_id, applied=False, reason="")
        if not first_seen:
            out.reason = "duplicate"
        elif ev.kind == "connected":
            out.applied = self.connect(ev, out, limits)
        elif ev.kind == "disconnected":
            out.applied = self.disconnect(ev, out)
        elif ev.kind in ("blocked", "unblocked"):
            return blocking.apply(self, ev, out)  # settles the user itself
        else:  # activity never reaches the rules (actors.events touches the buffer)
            out.reason = f"unsupported_{ev.kind}"
        if not out.applied and out.reason:
            self.journal.record_audit(
                kind="ignored",
                source=ev.source,
                user_id=ev.user_id,
                session_id=ev.session_id,
                reason=out.reason,
                occurred_at=ev.occurred_at,
                detail={"event": ev.kind},
            )
        ended_by = "session_limit" if ev.kind == "connected" else ev.reason or "logout"
        self.settle(ev.user_id, ev.occurred_at, out.applied, reason=ended_by)
        return out

    def apply_batch(
        self, events: Sequence[Event], order: Sequence[int], fresh: Sequence[bool], limits: Limits
    ) -> list[Outcome]:
        """A batch in ``order`` (``rows.batch_order``), ``fresh`` as the ledger answered in that
        order. The outcomes come back in the events' order; the last outcome of each user
        carries the snapshot to cache, the state after the whole batch."""
        outcomes: dict[int, Outcome] = {}
        for i, first in zip(order, fresh, strict=True):
            outcomes[i] = self.apply(events[i], first, limits)
        last = {events[i].user_id: i for i in order}
        for user_id, i in last.items():
            outcomes[i].snapshot = self.snapshot(user_id)
        return [outcomes[i] for i in range(len(events))]
