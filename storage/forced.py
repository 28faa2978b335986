"""The transitions no event drives: an administrator's disconnect and revoke, and the clock's
expiries. Pure code over a ``State``'s locked rows (``storage.rules``), like the block rules
(``storage.blocking``): nothing here loads, locks or saves.

They end sessions by force: whatever newer events were applied to them (an administrator or the
clock decides, not the event order), their ordering fence moving to the newest of the two times.
- ``force_disconnect`` ends every session and moves the user's logout fence (a ``disconnected``
  without session id would do the same, had it the last word);
- ``revoke_session`` ends one session; the user stays connected while another is open;
- ``expire_idle``: a connected user silent longer than the idle timeout ends (``idle_timeout``);
- ``expire_lifetime``: an open session older than ``SESSIOND_SESSION_MAX_S`` ends
  (``max_lifetime``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from storage.models import CONNECTED
from storage.rows import EXPIRED, EXPIRY_SOURCE, IDLE_REASON, LIFETIME_REASON, Outcome, Session

if TYPE_CHECKING:
    from storage.rules import State


def is_idle(user: dict[str, Any], *, cutoff: datetime, pending: datetime | None = None) -> bool:
    """A connected user whose newest activity (in the row or still buffered) is before
    ``cutoff``. A user never seen active is not idle: there is nothing to measure from."""
    seen = [t for t in (user["seen_at"], pending) if t is not None]
    return user["status"] == CONNECTED and bool(seen) and max(seen) < cutoff


def past_lifetime(session: Session, *, cutoff: datetime) -> bool:
    """An open session started before ``cutoff`` (``now - SESSIOND_SESSION_MAX_S``)."""
    return session.status == CONNECTED and session.started_at < cutoff


def force_disconnect(
    state: State, user_id: str, *, at: datetime, reason: str, source: str
) -> Outcome:
    """Ends all of a user's sessions as a ``disconnected`` event at ``at`` would, whatever
    newer events say; the user's logout fence moves to ``at``."""
    out = Outcome(user_id=user_id, applied=True, reason="applied")
    user = state.users[user_id]
    if user["logged_out_at"] is None or at > user["logged_out_at"]:
        user["logged_out_at"] = at
    out.ended_sessions = state.end_sessions(
        user_id, at=at, reason=reason, source=source, kind="forced_disconnect", force=True
    )
    state.settle(user_id, at, True, reason=reason)
    out.snapshot = state.snapshot(user_id)
    return out


def revoke_session(
    state: State, user_id: str, session_id: str, *, at: datetime, reason: str, source: str
) -> Outcome:
    """Ends one session; the user stays connected while another is open. ``applied`` is
    False when it was not open."""
    out = Outcome(user_id=user_id, applied=False, reason="not_open")
    out.ended_sessions = state.end_sessions(
        user_id, at=at, reason=reason, source=source, session_ids=[session_id],
        kind="forced_disconnect", force=True,
    )  # fmt: skip
    if out.ended_sessions:
        out.applied, out.reason = True, "applied"
    state.settle(user_id, at, out.applied, reason=reason)
    out.snapshot = state.snapshot(user_id)
    return out


def expire_idle(
    state: State,
    user_id: str,
    *,
    now: datetime,
    idle_timeout_s: int,
    pending: datetime | None = None,
    commit: bool = True,
) -> list[str] | None:
    """Ends every session of a user idle at ``now`` (``is_idle``); ``None`` when the user is
    not idle. One ``expired`` entry per ended session, one for the user when none was open.
    ``commit=False`` only decides (a dry run)."""
    user = state.users[user_id]
    cutoff = now - timedelta(seconds=idle_timeout_s)
    if not is_idle(user, cutoff=cutoff, pending=pending):
        return None
    if not commit:
        return [s.session_id for s in state.open_sessions(user_id)]
    detail = {"seen_at": _iso(user["seen_at"]), "idle_timeout_s": idle_timeout_s}
    ended = state.end_sessions(
        user_id, at=now, reason=IDLE_REASON, source=EXPIRY_SOURCE, kind=EXPIRED,
        force=True, detail=lambda _s: detail,
    )  # fmt: skip
    if not ended:
        state.journal.record_audit(
            kind=EXPIRED, source=EXPIRY_SOURCE, user_id=user_id, reason=IDLE_REASON,
            occurred_at=now, detail=detail,
        )  # fmt: skip
    state.settle(user_id, now, True, reason=IDLE_REASON)
    return ended


def expire_lifetime(
    state: State, user_id: str, *, now: datetime, session_max_s: int, commit: bool = True
) -> list[str]:
    """Ends the user's open sessions past their absolute lifetime (``past_lifetime``); the
    user stays connected while a younger one is open. ``commit=False`` only decides."""
    cutoff = now - timedelta(seconds=session_max_s)
    old = [s.session_id for s in state.open_sessions(user_id) if past_lifetime(s, cutoff=cutoff)]
    if not old or not commit:
        return old
    ended = state.end_sessions(
        user_id, at=now, reason=LIFETIME_REASON, source=EXPIRY_SOURCE, session_ids=old,
        kind=EXPIRED, force=True,
        detail=lambda s: {"started_at": _iso(s.started_at), "session_max_s": session_max_s},
    )  # fmt: skip
    state.settle(user_id, now, True, reason=LIFETIME_REASON)
    return ended


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
