"""The per-session idle rule (``storage.forced.expire_idle_sessions``) in memory, against a model
nobody can doubt: a session ends exactly when its own newest sign of life (its login, a request
in its row, a request still buffered) is older than the timeout, whatever the user's other
sessions did; the user is disconnected exactly when none is left (CONTRACT §8)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from sessiond.events import Event
from storage import forced
from storage.models import CONNECTED, DISCONNECTED
from storage.rows import EXPIRED, IDLE_REASON
from tests.unit.memory import Memory

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TIMEOUT = 100
SIDS = ("a", "b", "c", None)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


@st.composite
def users(draw: st.DrawFn) -> tuple[dict[str | None, tuple[int, int | None, int | None]], int]:
    """A user's open sessions: login time, a flushed request time, a buffered request time (in
    seconds from T0, each after the login); and the sweep's time."""
    sids = draw(st.sets(st.sampled_from(SIDS), min_size=1, max_size=4))
    out: dict[str | None, tuple[int, int | None, int | None]] = {}
    for sid in sids:
        login = draw(st.integers(0, 300))
        seen = draw(st.none() | st.integers(login, 400))
        pending = draw(st.none() | st.integers(login, 400))
        out[sid] = (login, seen, pending)
    return out, draw(st.integers(100, 500))


def setup(sessions: dict[str | None, tuple[int, int | None, int | None]]) -> Memory:
    memory = Memory()
    for sid, (login, _, _) in sessions.items():
        memory.apply_events(
            [Event(kind="connected", user_id="u", session_id=sid, occurred_at=at(login))]
        )
    for (_, sid), row in memory.sessions.items():
        seen = sessions[sid or None][1]
        row.last_seen_at = max(row.last_seen_at or T0, at(seen)) if seen is not None else None
    return memory


@settings(max_examples=300, deadline=None)
@given(users())
def test_each_session_ends_on_its_own_newest_sign_of_life(
    case: tuple[dict[str | None, tuple[int, int | None, int | None]], int],
) -> None:
    # Given a user's open sessions with their logins, flushed and buffered requests
    sessions, now = case
    memory = setup(sessions)
    pending = {("u", sid or ""): at(p) for sid, (_, _, p) in sessions.items() if p is not None}
    before = len(memory.outbox)

    # When the sweep runs at ``now``
    memory.sweep(now=at(now), idle_timeout_s=TIMEOUT, pending=pending)

    # Then exactly the sessions silent for longer than the timeout ended, for idle_timeout
    newest = {sid or "": max(t for t in s if t is not None) for sid, s in sessions.items()}
    idle = {sid for sid, t in newest.items() if t < now - TIMEOUT}
    assert {k[1] for k in memory.open_sessions()} == set(newest) - idle
    ended = {sid: row for (_, sid), row in memory.sessions.items() if row.status != CONNECTED}
    assert set(ended) == idle
    assert all(r.end_reason == IDLE_REASON and r.ended_at == at(now) for r in ended.values())
    # And each ended session is journaled and announced once; the user is disconnected (and
    # announced) exactly when none is left
    expired = [(a[2] or "", a[4]) for a in memory.audit if a[3] == EXPIRED]
    assert sorted(expired) == sorted((sid, IDLE_REASON) for sid in idle)
    out = memory.outbox[before:]
    assert sorted(s or "" for kind, _, s, _, _ in out if kind == "session.ended") == sorted(idle)
    gone = idle == set(newest)
    assert memory.users["u"]["status"] == (DISCONNECTED if gone else CONNECTED)
    assert [k for k, *_ in out if k == "user.disconnected"] == (["user.disconnected"] * gone)


@settings(max_examples=200, deadline=None)
@given(users())
def test_the_user_rule_ends_all_or_nothing_and_never_less_than_the_session_rule_keeps(
    case: tuple[dict[str | None, tuple[int, int | None, int | None]], int],
) -> None:
    # Given the same user swept by both rules (the user's newest activity: its newest session's)
    sessions, now = case
    by_session, by_user = setup(sessions), setup(sessions)
    newest = max(max(t for t in s if t is not None) for s in sessions.values())
    by_user.users["u"]["seen_at"] = at(newest)
    pending = {("u", sid or ""): at(p) for sid, (_, _, p) in sessions.items() if p is not None}

    # When each sweeps at ``now``
    by_session.sweep(now=at(now), idle_timeout_s=TIMEOUT, pending=pending)
    by_user.sweep(now=at(now), idle_timeout_s=TIMEOUT, idle_scope="user")

    # Then the per-user rule keeps all or none, and keeps every session the per-session one does
    kept = by_user.open_sessions()
    assert kept in (set(), {("u", sid or "") for sid in sessions})
    assert by_session.open_sessions() <= kept
    assert bool(kept) == (newest >= now - TIMEOUT)


def test_session_seen_counts_the_login_the_row_and_the_buffer() -> None:
    memory = setup({"a": (10, 50, None)})
    row = memory.sessions[("u", "a")]
    assert forced.session_seen(row) == at(50)
    assert forced.session_seen(row, at(70)) == at(70)
    row.last_seen_at = None  # a row written before migration 0007: measured from its login
    assert forced.session_seen(row) == at(10)
    assert forced.session_idle(row, cutoff=at(11)) and not forced.session_idle(row, cutoff=at(10))
