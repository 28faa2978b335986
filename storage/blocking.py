"""The block rules (CONTRACT §8), pure code over a ``State``'s locked rows like every other rule.

A block ends every open session (reason: the block's, by force: an administrator or the identity
provider decides, not the event order), moves the token fence (``logged_out_at``) to its time,
and makes every later login a no-op journaled ``refused_blocked`` (``State.connect``) until it is
lifted. Several sources may block one user; the strongest reason is kept (``blocked`` by an
administrator > ``idp_user_deleted`` > ``idp_user_disabled``) and the first block's time stays.
An unblock never brings sessions back, and leaves the fence: tokens issued before the block stay
revoked. Keycloak re-enabling a user lifts only a block of its own (``idp_user_disabled``).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Final

from sessiond.events import Event
from storage.rows import Outcome

if TYPE_CHECKING:
    from storage.rules import State

BLOCKED: Final = "blocked"
PRIORITY: Final = {"idp_user_disabled": 1, "idp_user_deleted": 2, BLOCKED: 3}


def block(state: State, user_id: str, *, at: datetime, reason: str, source: str) -> Outcome:
    out = Outcome(user_id=user_id, applied=True, reason="applied")
    user = state.users[user_id]
    current = user.get("blocked_reason")
    if current is None or PRIORITY.get(reason, 0) > PRIORITY.get(current, 0):
        user["blocked_reason"] = reason
    user["blocked_at"] = user.get("blocked_at") or at
    if user["logged_out_at"] is None or at > user["logged_out_at"]:
        user["logged_out_at"] = at
    state.journal.record_audit(
        kind=BLOCKED, source=source, user_id=user_id, reason=reason, occurred_at=at
    )
    out.ended_sessions = state.end_sessions(
        user_id, at=at, reason=reason, source=source, kind="forced_disconnect", force=True
    )
    state.settle(user_id, at, True, reason=reason)
    return out


def unblock(
    state: State, user_id: str, *, at: datetime, source: str, only_reason: str | None = None
) -> Outcome:
    """``applied`` is False when there was no block (of ``only_reason``) to lift."""
    user = state.users[user_id]
    lift = user.get("blocked_at") is not None and (
        only_reason is None or user.get("blocked_reason") == only_reason
    )
    if lift:
        user["blocked_at"], user["blocked_reason"] = None, None
        state.journal.record_audit(kind="unblocked", source=source, user_id=user_id, occurred_at=at)
    state.settle(user_id, at, lift)
    return Outcome(user_id=user_id, applied=lift, reason="applied" if lift else "not_blocked")


def apply(state: State, ev: Event, out: Outcome) -> Outcome:
    """A Keycloak ``blocked``/``unblocked`` event (user deleted, disabled, enabled again)."""
    if ev.kind == "blocked":
        done = block(state, ev.user_id, at=ev.occurred_at, reason=ev.reason or BLOCKED,
                     source=ev.source)  # fmt: skip
    else:
        done = unblock(state, ev.user_id, at=ev.occurred_at, source=ev.source,
                       only_reason=ev.reason)  # fmt: skip
    out.applied, out.reason, out.ended_sessions = done.applied, done.reason, done.ended_sessions
    return out
