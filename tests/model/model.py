"""The reference model: what the contract says one user's state is after a set of operations.

Deliberately tiny, so that nobody can doubt it (CONTRACT §1, README "Ordering and idempotency"):

- a user is a dict of sessions, each ``(open, newest)``: whether it is open and the time of the
  newest event applied to it, plus ``fence``, the newest logout of all sessions;
- ``connect(s, t)`` opens ``s`` when ``t`` is newer than ``s``'s newest event and than the fence;
- ``disconnect(s, t)`` ends ``s`` when ``t`` is at least as new as its newest event (on a tie,
  disconnect wins); an unknown ``s`` is remembered as ended at ``t``;
- ``disconnect(all, t)`` ends every session whose newest event is not newer than ``t`` and moves
  the fence to ``t``;
- ``admin(t)`` ends every session whatever its times (an admin decision does not depend on event
  order, README "Compatibility" 0.2.0) and moves the fence;
- ``expire(t)`` (the idle sweep) ends every open session;
- an event whose ``event_id`` was already applied is a no-op.

Times are *order keys*: ``occurred_at`` (epoch seconds) when the event carries one, else the
event's position in the queue ("events without occurred_at take queue order"), which is what a
correct sessiond must make of them once ingress order is event order (issue 11).

Everything here is pure: no I/O, no clock. The checker (``tests.model.checker``) decides which
operations the running system may or must have applied at a given instant, and asks this module
what state that gives.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["connect", "disconnect", "admin", "expire"]
IMPLICIT = ""
"""The one session of a user whose events carry no ``session_id`` (CONTRACT §1)."""
NEVER = float("-inf")


@dataclass(slots=True)
class Op:
    """One state-changing operation of one user, as recorded by the runner.

    ``order`` is the model's time of the operation (see the module docstring). ``invoked`` and
    ``completed`` are ``time.monotonic()`` readings: from ``invoked`` on the system *may* have
    applied it, ``completed`` starts the revocation bound after which it *must* have.
    ``touch_lo``/``touch_hi`` bound the instant (monotonic) a ``connect`` counts as a sign of
    life for the idle timeout: its ``occurred_at``, or when it reached sessiond."""

    user: str
    kind: Kind
    order: float
    session: str | None = None  # None on disconnect/admin/expire: all sessions
    event_id: str | None = None
    invoked: float = 0.0
    completed: float | None = None  # None: still in flight (or never confirmed)
    touch_lo: float | None = None
    touch_hi: float | None = None
    label: str = ""  # what the generator meant (login, replay, dup, late...), for reports

    def describe(self) -> str:
        sid = "*" if self.session is None else repr(self.session)
        comp = "?" if self.completed is None else f"{self.completed:.3f}"
        eid = f" id={self.event_id}" if self.event_id else ""
        return (
            f"{self.kind}({sid}) order={self.order:.6f}{eid} [{self.invoked:.3f}..{comp}]"
            f" {self.label}".rstrip()
        )


@dataclass(slots=True)
class UserState:
    """What the model knows of one user after some operations."""

    sessions: dict[str, tuple[bool, float]] = field(default_factory=dict)
    fence: float = NEVER
    applied_ids: set[str] = field(default_factory=set)
    touches: list[Op] = field(default_factory=list)  # connects that changed the state

    def open_sessions(self) -> set[str]:
        return {sid for sid, (is_open, _) in self.sessions.items() if is_open}

    def connected(self) -> bool:
        return bool(self.open_sessions())

    def active(self, session: str | None) -> bool:
        """Whether a token of this user (with ``sid`` = ``session``, or none) may be granted,
        idle timeout aside."""
        if session is None:
            return self.connected()
        return self.sessions.get(session, (False, NEVER))[0]


def apply(state: UserState, op: Op) -> bool:
    """Applies ``op``; True when it changed something (a fresh, non-stale event)."""
    if op.event_id is not None:
        if op.event_id in state.applied_ids:
            return False
        state.applied_ids.add(op.event_id)
    t = op.order
    before = dict(state.sessions), state.fence
    if op.kind == "connect":
        sid = IMPLICIT if op.session is None else op.session
        newest = state.sessions.get(sid, (False, NEVER))[1]
        if t > newest and t > state.fence:
            state.sessions[sid] = (True, t)
            state.touches.append(op)
    elif op.kind == "disconnect" and op.session is not None:
        newest = state.sessions.get(op.session, (False, NEVER))[1]
        if t >= newest:
            state.sessions[op.session] = (False, t)
    elif op.kind == "disconnect":
        state.fence = max(state.fence, t)
        for sid, (_, newest) in list(state.sessions.items()):
            if newest <= t:
                state.sessions[sid] = (False, t)
    elif op.kind == "admin":
        state.fence = max(state.fence, t)
        for sid, (_, newest) in list(state.sessions.items()):
            state.sessions[sid] = (False, max(newest, t))
    else:  # expire
        for sid, (is_open, newest) in list(state.sessions.items()):
            if is_open:
                state.sessions[sid] = (False, max(newest, t))
    return (dict(state.sessions), state.fence) != before


def replay(ops: Iterable[Op]) -> UserState:
    """The state after ``ops`` applied in model order (ties keep their recorded order)."""
    state = UserState()
    for op in sorted(ops, key=lambda o: o.order):
        apply(state, op)
    return state
