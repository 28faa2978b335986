"""The checker: every recorded HTTP answer, and the final PostgreSQL state, against the model.

Jepsen's way (STYLE.md, "Checking a running system against a model"): every operation is an
invocation and a completion on one monotonic clock, and the history is checked offline.

A 200 for request ``r`` is legal when, at some instant ``x`` between its invocation and its
completion, a state the system may legitimately show grants it. At ``x`` the system

- *must* have applied every operation completed at least the revocation bound before ``x``
  (longer when a fault overlapped: the bound restarts when the fault ends, plus the documented
  recovery time);
- *may* have applied any operation invoked before ``x``.

Of those allowed states, the most permissive one applies every connect it may and every
disconnect-like operation only when it must: a connect never ends anything and a disconnect
never opens anything, so if that state refuses, every allowed state refuses. On top of it the
idle timeout must not have passed since the newest possible sign of life (an applied connect, a
granted request). A 200 outside that is a violation, the one this checker exists for.

During outages the answers must be 403 or 503: a 401 for a well-formed token (but ``revoked``,
the token fence of CONTRACT §8: a token issued before a logout everywhere) or any other 5xx is a
violation as well. At the end, after quiescence, PostgreSQL must hold exactly the model's
sessions ("never a lost event"); the only excuse is a session the idle sweep ended (reason
``idle_timeout``) that was, by the recorded history, possibly silent for the idle timeout: the
system under test measures each session on its own (CONTRACT §8), from its logins and the grants
of its tokens (a token without ``sid``: the implicit session's). Grants are still checked against
the user's newest sign of life, which any state of either idle rule allows.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tests.model.model import IMPLICIT, Op, UserState, replay

# The documented revocation bound, docs/reliability.md "Revocation bound (the cache and
# PostgreSQL)": once a revocation has committed, every API process refuses within
# SESSIOND_CACHE_RECONCILE_S (2 s) plus one reconciler turn, plus the Redis socket timeout (2 s)
# when a call hangs; counted from the commit, or from when Redis is reachable again (the fault
# extension below). README "Measured" puts publish -> first 403 at ~10 ms normally. The pipeline
# slack (publish -> commit) is for this loaded, shared 2-core machine: batching, a worker's
# backoff after a transient error.
RECONCILE_PERIOD_S = 2.0
REDIS_SOCKET_TIMEOUT_S = 2.0
PIPELINE_SLACK_S = 3.0
REVOCATION_BOUND_S = RECONCILE_PERIOD_S + REDIS_SOCKET_TIMEOUT_S + PIPELINE_SLACK_S

# After a fault ends, the bound restarts once the pipeline has recovered. docs/reliability.md
# "Faults": measured recovery is at most 4.6 s (RabbitMQ restarted); the system under test retries
# with a backoff of at most 2 s (SESSIOND_RETRY_MAX_BACKOFF_MS, as the fault tests use), and a
# restarted worker takes a few seconds to boot on this machine.
FAULT_RECOVERY_S = 10.0

# The API compares the newest sign of life with SESSIOND_IDLE_TIMEOUT_S at request time (README
# "Configuration"); API processes share activity through Redis every 0.1 s (api/access.py
# Recorder). One second covers that and clock reading differences.
IDLE_SLACK_S = 1.0

INF = math.inf


@dataclass(slots=True)
class Request:
    """One ``GET /auth/check`` or ``/api/me`` with a minted token; ``status`` None: no answer."""

    user: str
    session: str | None
    route: str
    invoked: float
    completed: float
    status: int | None
    reason: str = ""

    def describe(self) -> str:
        sid = "-" if self.session is None else repr(self.session)
        return (
            f"GET {self.route} sid={sid} [{self.invoked:.3f}..{self.completed:.3f}]"
            f" -> {self.status} {self.reason}".rstrip()
        )


@dataclass(slots=True)
class Fault:
    """A nemesis action; ``end`` None while it lasts."""

    kind: str
    start: float
    end: float | None = None
    detail: str = ""


@dataclass(slots=True)
class PgUser:
    """What PostgreSQL holds for one user at the end."""

    status: str
    open: set[str] = field(default_factory=set)
    ended_idle: set[str] = field(default_factory=set)  # ended sessions, reason idle_timeout


@dataclass(slots=True)
class Violation:
    kind: str
    user: str
    at: float
    message: str
    context: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Bounds:
    idle_timeout_s: float
    revocation_s: float = REVOCATION_BOUND_S
    recovery_s: float = FAULT_RECOVERY_S
    idle_slack_s: float = IDLE_SLACK_S


def deadline(at: float | None, faults: Sequence[Fault], bounds: Bounds) -> float:
    """When an operation completed at ``at`` must be visible: the revocation bound, restarted
    after the recovery time of every fault that overlaps the wait."""
    if at is None:
        return INF
    due = at + bounds.revocation_s
    changed = True
    while changed:
        changed = False
        for f in faults:
            end = INF if f.end is None else f.end
            if f.start <= due and end >= at and end + bounds.recovery_s + bounds.revocation_s > due:
                due = end + bounds.recovery_s + bounds.revocation_s
                changed = True
    return due


class Checker:
    """Checks one run's history; ``ops``, ``requests`` and ``faults`` as the runner recorded."""

    def __init__(
        self,
        ops: Iterable[Op],
        requests: Iterable[Request],
        faults: Sequence[Fault],
        bounds: Bounds,
    ) -> None:
        self.bounds = bounds
        self.faults = list(faults)
        self.ops: dict[str, list[Op]] = defaultdict(list)
        for op in ops:
            self.ops[op.user].append(op)
        self.requests: dict[str, list[Request]] = defaultdict(list)
        for r in requests:
            self.requests[r.user].append(r)
        self._due: dict[int, float] = {}

    def due(self, op: Op) -> float:
        key = id(op)
        if key not in self._due:
            self._due[key] = deadline(op.completed, self.faults, self.bounds)
        return self._due[key]

    def touch_hi(self, op: Op, x: float) -> float:
        """Latest instant ``op`` can have counted as a sign of life, seen from ``x``."""
        hi = op.touch_hi if op.touch_hi is not None else self.due(op)
        return min(hi, x)

    # ------------------------------------------------------------------ answers

    def state_at(self, user: str, x: float) -> UserState:
        """The most permissive state the system may show at ``x`` (module docstring)."""
        chosen = [
            op
            for op in self.ops[user]
            if (op.kind == "connect" and op.invoked <= x) or self.due(op) <= x
        ]
        return replay(chosen)

    def may_grant(self, r: Request, x: float) -> bool:
        if not self.state_at(r.user, x).active(r.session):
            return False
        lives = [
            self.touch_hi(op, x)
            for op in self.ops[r.user]
            if op.kind == "connect" and op.invoked <= x
        ]
        lives += [
            min(q.completed, x)
            for q in self.requests[r.user]
            if q is not r and q.status == 200 and q.invoked <= x
        ]
        newest = max(lives, default=-INF)
        return x - newest <= self.bounds.idle_timeout_s + self.bounds.idle_slack_s

    def instants(self, r: Request) -> list[float]:
        """Where the answer to ``r`` can change inside its interval: its ends, and every moment
        an operation becomes possible or due, or another grant completes."""
        points = {r.invoked, r.completed}
        for op in self.ops[r.user]:
            for p in (op.invoked, self.due(op)):
                if r.invoked < p < r.completed:
                    points.add(p)
        for q in self.requests[r.user]:
            if q.status == 200 and r.invoked < q.completed < r.completed:
                points.add(q.completed)
        return sorted(points)

    def check_request(self, r: Request) -> Violation | None:
        if r.status is None or r.status in (403, 503):
            return None
        if r.status == 401 and r.reason == "revoked":
            return None  # the token fence (CONTRACT §8): a refusal, never a grant
        if r.status == 200:
            if any(self.may_grant(r, x) for x in self.instants(r)):
                return None
            return Violation(
                "wrong_200",
                r.user,
                r.completed,
                f"{r.describe()}: the model refuses at every instant of the request "
                f"(revocation bound {self.bounds.revocation_s:.0f} s, fault recovery "
                f"{self.bounds.recovery_s:.0f} s, idle timeout {self.bounds.idle_timeout_s:.0f} s)",
            )
        return Violation(
            "bad_status",
            r.user,
            r.completed,
            f"{r.describe()}: a valid token gets 200, 403 or 503, never this",
        )

    # ------------------------------------------------------------------ final state

    def possibly_silent(self, user: str, end: float, session: str) -> bool:
        """Whether the session can have gone a whole idle timeout without a sign of life."""
        spans = [
            (op.touch_lo if op.touch_lo is not None else op.invoked, self.touch_hi(op, end))
            for op in self.ops[user]
            if op.kind == "connect" and (op.session or IMPLICIT) == session
        ]
        spans += [
            (q.invoked, q.completed)
            for q in self.requests[user]
            if q.status == 200 and (q.session or IMPLICIT) == session
        ]
        spans.sort()
        limit = self.bounds.idle_timeout_s - self.bounds.idle_slack_s
        for (lo, _), (_, next_hi) in itertools.pairwise(spans):
            if next_hi - lo > limit:
                return True
        return bool(spans) and end - spans[-1][0] > limit

    def check_final(self, user: str, pg: PgUser | None, end: float) -> list[Violation]:
        state = replay(self.ops[user])
        want = state.open_sessions()
        have = set() if pg is None else pg.open
        found: list[Violation] = []
        for sid in sorted(have - want):
            found.append(
                Violation(
                    "final_state",
                    user,
                    end,
                    f"session {sid!r} is open in PostgreSQL, ended in the model"
                    " (a logout lost, or applied out of order)",
                )
            )
        for sid in sorted(want - have):
            if pg is not None and sid in pg.ended_idle and self.possibly_silent(user, end, sid):
                continue
            found.append(
                Violation(
                    "final_state",
                    user,
                    end,
                    f"session {sid!r} is open in the model, not in PostgreSQL (a login lost, or"
                    " applied out of order)",
                )
            )
        if pg is not None and (pg.status == "connected") != bool(pg.open):
            found.append(
                Violation("final_state", user, end, f"users.status {pg.status} with open {pg.open}")
            )
        return found

    # ------------------------------------------------------------------ all

    def check(
        self, final: dict[str, PgUser], end: float, skip_final: set[str] | None = None
    ) -> list[Violation]:
        """Every request; the final state of every user but ``skip_final`` (an admin disconnect
        never answered: whether it committed is unknown; its requests are still checked, the
        disconnect counting as never due)."""
        found: list[Violation] = []
        for user in sorted(set(self.ops) | set(self.requests)):
            for r in self.requests[user]:
                v = self.check_request(r)
                if v is not None:
                    found.append(v)
            if user in self.ops and user not in (skip_final or set()):
                found += self.check_final(user, final.get(user), end)
        for v in found:
            v.context = self.context(v.user, v.at)
        return found

    def context(self, user: str, at: float, before: float = 20.0, after: float = 5.0) -> list[str]:
        """The user's operations up to ``at`` (a history has a few dozen at most), the requests
        and faults around it, in invocation order."""
        lines: list[tuple[float, str]] = []
        for op in self.ops[user]:
            if op.invoked <= at + after:
                lines.append((op.invoked, f"op  {op.describe()} due={self.due(op):.3f}"))
        nearby = [r for r in self.requests[user] if at - before <= r.invoked <= at + after]
        for r in nearby[-30:]:
            lines.append((r.invoked, f"req {r.describe()}"))
        for f in self.faults:
            end = INF if f.end is None else f.end
            if f.start <= at + after and end >= at - before:
                lines.append((f.start, f"nemesis {f.kind} [{f.start:.3f}..{end:.3f}] {f.detail}"))
        return [text for _, text in sorted(lines, key=lambda item: item[0])]
