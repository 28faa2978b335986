"""The session rules (``storage.rules``) against a reference model nobody can doubt, in memory.

The model is a dict of sessions and the newest event time per session. Delivery is at-least-once
and unordered (CONTRACT §1), so whatever order, duplication, replay and batching a history
arrives in, the sessions left open must be the ones the model names: those whose newest
``connected`` is strictly newer than every ``disconnected`` of that session and every logout of
all the user's sessions.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sessiond.events import Event
from storage.rows import IMPLICIT, Limits
from tests.unit.memory import Memory

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
USERS = ("a", "b")
SESSIONS = (None, "x", "y")
Key = tuple[str, str]


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def reference(events: list[Event]) -> set[Key]:
    """The open sessions a set of events leaves, whatever order they came in."""
    newest_connect: dict[Key, datetime] = {}
    newest_end: dict[Key, datetime] = {}
    logout: dict[str, datetime] = {}
    for ev in events:
        key = (ev.user_id, ev.session_id or IMPLICIT)
        if ev.kind == "connected":
            newest_connect[key] = max(newest_connect.get(key, ev.occurred_at), ev.occurred_at)
        elif ev.session_id is None:
            logout[ev.user_id] = max(logout.get(ev.user_id, ev.occurred_at), ev.occurred_at)
        else:
            newest_end[key] = max(newest_end.get(key, ev.occurred_at), ev.occurred_at)
    return {
        key
        for key, t in newest_connect.items()
        if all(t > end for end in (newest_end.get(key), logout.get(key[0])) if end is not None)
    }


@st.composite
def histories(draw: st.DrawFn) -> list[Event]:
    """Distinct events of two users over three sessions and few instants (ties are common);
    an ``event_id``, when present, names one event."""
    raw = draw(
        st.lists(
            st.tuples(
                st.sampled_from(("connected", "disconnected")),
                st.sampled_from(USERS),
                st.sampled_from(SESSIONS),
                st.integers(0, 6),
                st.booleans(),
            ),
            min_size=1,
            max_size=14,
            unique_by=lambda t: t[:4],
        )
    )
    return [
        Event(
            kind=kind,  # type: ignore[arg-type]
            user_id=user,
            session_id=sid,
            occurred_at=at(t),
            event_id=f"e{n}" if with_id else None,
        )
        for n, (kind, user, sid, t, with_id) in enumerate(raw)
    ]


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[Event], list[list[Event]], set[int]]:
    """A history, and how it arrives: every event at least once, some several times, in any
    order, cut into batches; ``forget`` lists batches before which the ledger is lost (a replay
    older than the de-duplication retention)."""
    events = draw(histories())
    extra = draw(st.lists(st.sampled_from(events), max_size=8))
    arrival = draw(st.permutations(events + extra))
    cuts = sorted(draw(st.sets(st.integers(1, max(len(arrival) - 1, 1)), max_size=6)))
    bounds = [0, *cuts, len(arrival)]
    batches = [arrival[a:b] for a, b in itertools.pairwise(bounds) if a < b]
    forget = draw(st.sets(st.integers(0, len(batches) - 1), max_size=2))
    return events, batches, forget


def session_events(memory: Memory) -> dict[Key, list[str]]:
    out: dict[Key, list[str]] = defaultdict(list)
    for kind, user, sid, _reason, _at in memory.outbox:
        if kind != "user.disconnected":
            out[(user, sid or IMPLICIT)].append(kind)
    return out


@settings(max_examples=300, deadline=None)
@given(deliveries())
def test_any_order_duplication_replay_and_batching_ends_as_the_model(
    delivery: tuple[list[Event], list[list[Event]], set[int]],
) -> None:
    # Given a history delivered out of order, with duplicates, in batches
    events, batches, forget = delivery
    memory = Memory()

    # When each batch is applied as one unit of work
    for n, batch in enumerate(batches):
        if n in forget:
            memory.ledger.clear()
        outcomes = memory.apply_events(batch)
        # Then each user's last outcome of the batch carries the state the batch left
        for out in outcomes:
            if out.snapshot is not None:
                mine = {sid for u, sid in memory.open_sessions() if u == out.user_id}
                assert set(out.snapshot.sessions) == mine
                assert out.snapshot.connected == bool(mine)

    # Then exactly the sessions the model names are open, and a user is connected iff one is
    expected = reference(events)
    assert memory.open_sessions() == expected
    assert memory.connected_users() == {u for u, _ in expected}
    # And each session's lifecycle events out alternate, started first, ending as it ends
    announced = session_events(memory)
    for key in set(announced) | expected:
        kinds = announced.get(key, [])
        assert kinds == [("session.started", "session.ended")[i % 2] for i in range(len(kinds))]
        assert (len(kinds) % 2 == 1) == (key in expected), (key, kinds)


@settings(max_examples=200, deadline=None)
@given(deliveries(), st.integers(1, 2))
def test_a_session_limit_only_ever_ends_sessions(
    delivery: tuple[list[Event], list[list[Event]], set[int]], limit: int
) -> None:
    # Given a history delivered in any order, with a limit on open sessions per user
    events, batches, _ = delivery
    memory = Memory()

    # When it is applied
    for batch in batches:
        memory.apply_events(batch, limits=Limits(max_sessions_per_user=limit))

    # Then no user holds more than the limit, and no session is open that the model ends
    # (which ones stay open depends on arrival order: the newest arrival wins)
    opened = memory.open_sessions()
    assert opened <= reference(events)
    assert all(sum(u == user for u, _ in opened) <= limit for user in USERS)
    assert memory.connected_users() == {u for u, _ in opened}


def test_the_model_itself_on_known_histories() -> None:
    # A tie between a connect and a logout refuses; a newer connect wins over an older logout.
    c = Event(kind="connected", user_id="a", session_id="x", occurred_at=at(5))
    d = Event(kind="disconnected", user_id="a", occurred_at=at(5))
    later = Event(kind="connected", user_id="a", session_id="y", occurred_at=at(6))
    assert reference([c, d]) == set()
    assert reference([c, d, later]) == {("a", "y")}
    assert reference([later, c]) == {("a", "x"), ("a", "y")}


class LiveHistory(RuleBasedStateMachine):
    """Events mixed with decisions that are not events (an admin's disconnect, revoke, block and
    unblock, the idle and lifetime sweeps), applied in one live order. The model: per session,
    whether it is open and the newest time applied to it; per user, the newest logout of all
    sessions and whether they are blocked (no login applies while they are)."""

    def __init__(self) -> None:
        super().__init__()
        self.memory = Memory()
        self.now = 100
        self.sent: list[Event] = []
        self.open: set[Key] = set()
        self.newest: dict[Key, int] = {}
        self.fence: dict[str, int] = {}
        self.blocked: set[str] = set()

    def _apply(self, ev: Event) -> None:
        key = (ev.user_id, ev.session_id or IMPLICIT)
        t = int((ev.occurred_at - T0).total_seconds())
        if ev.kind == "connected":
            if ev.user_id in self.blocked:
                return
            if t > self.newest.get(key, -1) and t > self.fence.get(ev.user_id, -1):
                self.open.add(key)
                self.newest[key] = t
        elif ev.session_id is None:
            self.fence[ev.user_id] = max(self.fence.get(ev.user_id, t), t)
            for k in [k for k in self.open if k[0] == ev.user_id and self.newest[k] <= t]:
                self.open.discard(k)
            self.newest[key] = max(self.newest.get(key, t), t)
        elif t >= self.newest.get(key, -1):
            self.open.discard(key)
            self.newest[key] = t

    def _end(self, keys: list[Key]) -> None:
        for k in keys:
            self.open.discard(k)
            self.newest[k] = max(self.newest[k], self.now)

    @rule(
        kind=st.sampled_from(("connected", "disconnected")),
        user=st.sampled_from(USERS),
        sid=st.sampled_from(SESSIONS),
        skew=st.integers(-3, 3),
    )
    def event(self, kind: str, user: str, sid: str | None, skew: int) -> None:
        ev = Event(kind=kind, user_id=user, session_id=sid, occurred_at=at(self.now + skew))  # type: ignore[arg-type]
        if ev in self.sent:
            return  # same content, same key: covered by ``replay``
        self.sent.append(ev)
        self.memory.apply_events([ev])
        self._apply(ev)

    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        if self.sent:
            self.memory.apply_events([data.draw(st.sampled_from(self.sent))])

    @rule(ticks=st.integers(1, 5))
    def tick(self, ticks: int) -> None:
        self.now += ticks

    @rule(user=st.sampled_from(USERS))
    def admin_disconnect(self, user: str) -> None:
        self.memory.force_disconnect(user, at=at(self.now))
        self._end([k for k in self.open if k[0] == user])
        self.fence[user] = max(self.fence.get(user, self.now), self.now)

    @rule(user=st.sampled_from(USERS))
    def admin_block(self, user: str) -> None:
        self.memory.block(user, at=at(self.now))
        self._end([k for k in self.open if k[0] == user])
        self.fence[user] = max(self.fence.get(user, self.now), self.now)
        self.blocked.add(user)

    @rule(user=st.sampled_from(USERS))
    def admin_unblock(self, user: str) -> None:
        self.memory.unblock(user, at=at(self.now))
        self.blocked.discard(user)

    @rule(user=st.sampled_from(USERS), sid=st.sampled_from(SESSIONS))
    def admin_revoke(self, user: str, sid: str | None) -> None:
        self.memory.revoke_session(user, sid or IMPLICIT, at=at(self.now))
        self._end([k for k in self.open if k == (user, sid or IMPLICIT)])

    @rule()
    def idle_sweep(self) -> None:
        # Everyone connected was last seen at most ``now + 3``: a 1 s timeout 10 s later idles all.
        self.now += 10
        self.memory.sweep(now=at(self.now), idle_timeout_s=1)
        self._end(sorted(self.open))

    @rule()
    def lifetime_sweep(self) -> None:
        self.now += 10
        self.memory.sweep(now=at(self.now), idle_timeout_s=10**6, session_max_s=1)
        self._end(sorted(self.open))

    @invariant()
    def open_sessions_match(self) -> None:
        assert self.memory.open_sessions() == self.open
        assert self.memory.connected_users() == {u for u, _ in self.open}
        assert {u for u, row in self.memory.users.items() if row.get("blocked_at")} == self.blocked


TestLiveHistory = LiveHistory.TestCase
TestLiveHistory.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
