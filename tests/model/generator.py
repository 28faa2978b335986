"""Seeded histories: what each simulated user does, decided before anything runs.

A history is one user's script: logins and logouts per session (or of the implicit session),
logouts of all sessions, duplicates, replays of older events, late (out-of-order) deliveries,
admin disconnects, idle periods, and the requests that probe the user's tokens in between.
``history(seed, index)`` depends on nothing but its arguments, so a seed replays the same
scripts; only the timing of the real system differs between runs.

Two kinds of users:

- **timed**: every event carries ``occurred_at`` (the wall clock when the generator makes it);
  late deliveries and replays really arrive out of order. Admin disconnects and idle periods
  happen only here: their time is the server's clock, comparable with ``occurred_at``.
- **untimed**: no ``occurred_at``, the seed's own form (CONTRACT §1); their order is the queue's.
  A replay or a duplicate without ``event_id`` is then a *new* event (the time it reached
  sessiond); with one it is a no-op. Duplicates follow their original at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Action = Literal[
    "login",  # connected (session or implicit)
    "logout",  # disconnected of one session (implicit users: of all)
    "logout_all",  # disconnected without session_id
    "burst",  # login then logout of a session, back to back, nothing in between
    "dup",  # the previous event again, at once
    "replay",  # an earlier event of this history again
    "late",  # the next event is published after the one that follows it
    "admin",  # POST /admin/users/<id>/disconnect
    "idle",  # nothing at all for longer than idle timeout + expiry period
    "probe",  # ``count`` requests with the user's tokens
    "pause",  # sleep ``seconds``
]
Route = Literal["/auth/check", "/api/me"]


@dataclass(frozen=True, slots=True)
class Probe:
    session: str | None  # the token's sid claim
    route: Route


@dataclass(frozen=True, slots=True)
class Step:
    action: Action
    session: str | None = None
    with_id: bool = False
    seconds: float = 0.0
    pick: int = 0  # replay: which earlier event (modulo how many there are)
    probes: tuple[Probe, ...] = ()


@dataclass(frozen=True, slots=True)
class History:
    index: int
    user: str
    timed: bool
    sessions: tuple[str | None, ...]
    steps: tuple[Step, ...]

    def tokens(self) -> tuple[str | None, ...]:
        """Every sid a probe of this user can carry: none, or one of the named sessions."""
        return (None, *[s for s in self.sessions if s is not None])


EVENT_ACTIONS: frozenset[str] = frozenset({"login", "logout", "logout_all", "burst"})


def history(seed: int, index: int, *, run: str) -> History:
    """The ``index``-th history of ``seed``; ``run`` only prefixes the user id."""
    rng = random.Random(f"{seed}/{index}")
    timed = rng.random() < 0.5
    sessions: tuple[str | None, ...] = rng.choice([(None,), ("a",), ("a", "b")])
    id_rate = rng.choice([0.0, 0.5, 1.0])
    named = [s for s in sessions if s is not None]

    def probes() -> tuple[Probe, ...]:
        count = rng.choice([0, 1, 1, 2, 3])
        tokens: list[str | None] = [None, *named]
        return tuple(
            Probe(rng.choice(tokens), "/auth/check" if rng.random() < 0.7 else "/api/me")
            for _ in range(count)
        )

    steps: list[Step] = [Step("login", rng.choice(sessions), rng.random() < id_rate)]
    steps.append(Step("probe", probes=probes()))
    idled = False
    for _ in range(rng.randint(4, 12)):
        roll = rng.random()
        session = rng.choice(sessions)
        with_id = rng.random() < id_rate
        if roll < 0.28:
            steps.append(Step("login", session, with_id))
        elif roll < 0.48:
            steps.append(Step("logout", session, with_id))
        elif roll < 0.56:
            steps.append(Step("logout_all", None, with_id))
        elif roll < 0.66:
            steps.append(Step("burst", session, with_id))
        elif roll < 0.73:
            steps.append(Step("dup"))
        elif roll < 0.80:
            steps.append(Step("replay", pick=rng.randrange(1000)))
        elif roll < 0.87 and timed:
            steps.append(Step("late"))
            steps.append(Step("login" if rng.random() < 0.5 else "logout", session, with_id))
        elif roll < 0.93 and timed:
            # A second for the login to be applied and cached first: an admin disconnect that
            # must evict a cached entry is the interesting one (issue 11 scenario 2).
            steps.append(Step("login", session, with_id))
            steps.append(Step("pause", seconds=1.0))
            steps.append(Step("probe", probes=(Probe(session, "/auth/check"),)))
            steps.append(Step("admin"))
        elif roll < 0.96 and timed and not idled:
            idled = True
            steps.append(Step("login", session, with_id))
            steps.append(Step("idle"))
        else:
            steps.append(Step("login", session, with_id))
        steps.append(Step("probe", probes=probes()))
        steps.append(Step("pause", seconds=rng.choice([0.0, 0.05, 0.2, 0.5, 1.0])))
    return History(
        index=index,
        user=f"{run}-{index}",
        timed=timed,
        sessions=sessions,
        steps=tuple(steps),
    )


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """One nemesis action: wait ``after`` seconds, then ``kind`` for ``seconds``."""

    kind: str
    after: float
    seconds: float


FAULT_KINDS: tuple[str, ...] = ("kill_worker", "restart_rabbitmq", "pause_redis", "stop_postgres")
# On the local cluster (tests.model.cluster_nemesis): one node of a kind at a time, crashed.
CLUSTER_FAULT_KINDS: tuple[str, ...] = (
    "kill_worker", "kill_rabbitmq", "pause_redis", "kill_redis", "failover_postgres",
)  # fmt: skip


def fault_plan(seed: int, index: int, kinds: tuple[str, ...] = FAULT_KINDS) -> FaultPlan:
    """The ``index``-th fault of ``seed``: every kind in turn (in a seeded order), so that even
    a short run meets several. Redis pauses sometimes outlast the reconciler's 10 s look-back
    (issue 11 scenario 2)."""
    rng = random.Random(f"{seed}/nemesis/{index}")
    order = list(kinds)
    random.Random(f"{seed}/nemesis").shuffle(order)
    kind = order[index % len(order)]
    after = rng.uniform(2.0, 6.0)
    seconds = {
        "kill_worker": rng.uniform(0.5, 3.0),
        "restart_rabbitmq": 0.0,  # the stop and the start take what they take
        "pause_redis": rng.choice([3.0, 6.0, 12.0, 16.0]),
        "stop_postgres": rng.uniform(2.0, 8.0),
        "kill_rabbitmq": rng.uniform(2.0, 10.0),  # dead, then restarted
        "kill_redis": 0.0,  # restarted once its replica took over, however long that takes
        "failover_postgres": rng.uniform(1.0, 4.0),  # primary dead until the promotion
    }.get(kind, 1.0)
    return FaultPlan(kind=kind, after=after, seconds=seconds)
