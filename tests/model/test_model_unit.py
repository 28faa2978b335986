"""The reference model and the checker on synthetic histories (pure: no servers).

The checker must flag a wrong 200 and accept every legal interleaving; these tests pin both
directions, plus the model's rules (CONTRACT §1) and the generator's determinism."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.model.checker import (
    REVOCATION_BOUND_S,
    Bounds,
    Checker,
    Fault,
    PgUser,
    Request,
    deadline,
)
from tests.model.generator import fault_plan, history
from tests.model.model import Op, UserState, apply, replay

BOUNDS = Bounds(idle_timeout_s=10.0)
U = "u"


def connect(order: float, at: float, session: str | None = None, **kw: object) -> Op:
    op = Op(U, "connect", order, session, invoked=at, completed=at + 0.01, **kw)  # type: ignore[arg-type]
    op.touch_lo = op.touch_hi = at
    return op


def disconnect(order: float, at: float, session: str | None = None) -> Op:
    return Op(U, "disconnect", order, session, invoked=at, completed=at + 0.01)


def get(at: float, status: int, session: str | None = None, took: float = 0.01) -> Request:
    return Request(U, session, "/auth/check", at, at + took, status)


def verdicts(
    ops: list[Op], requests: list[Request], faults: list[Fault] | None = None
) -> list[str]:
    checker = Checker(ops, requests, faults or [], BOUNDS)
    return [v.kind for r in requests if (v := checker.check_request(r)) is not None]


# ---------------------------------------------------------------------- the model's rules


def test_newest_event_wins_whatever_the_delivery_order() -> None:
    # Given a login at 1, its logout at 2 and a new login at 3, in every delivery order
    ops = [connect(1, 0), disconnect(2, 0), connect(3, 0)]
    for perm in itertools.permutations(ops):
        # Then the model's state is the one the times say (order keys, not arrival)
        assert replay(perm).open_sessions() == {""}
    assert not replay(ops[:2]).connected()


def test_tie_goes_to_the_disconnect_and_logout_all_fences_older_logins() -> None:
    assert not replay([connect(5, 0, "a"), disconnect(5, 0, "a")]).connected()
    state = replay([connect(1, 0, "a"), disconnect(4, 0), connect(3, 0, "b"), connect(6, 0, "c")])
    assert state.open_sessions() == {"c"}


def test_a_logout_of_an_unknown_session_fences_the_late_login() -> None:
    assert not replay([disconnect(2, 0, "a"), connect(1, 0, "a")]).connected()


def test_admin_ends_every_session_and_fences_older_logins() -> None:
    admin = Op(U, "admin", 5, invoked=0, completed=0)
    assert not replay([connect(4, 0, "a"), connect(4.5, 0, "b"), admin]).connected()
    assert not replay([connect(4, 0, "a"), admin, connect(3, 0, "b")]).connected()
    assert replay([connect(4, 0, "a"), admin, connect(6, 0, "a")]).connected()


def test_expire_ends_open_sessions() -> None:
    expire = Op(U, "expire", 5)
    state = replay([connect(1, 0, "a"), expire, connect(3, 0, "a")])
    assert not state.connected()  # the sweep's fence: older logins stay stale


def test_a_duplicate_event_id_is_a_no_op() -> None:
    first = connect(1, 0, event_id="e1")
    again = connect(7, 0, event_id="e1")  # same id, later position in the queue
    assert replay([first, disconnect(3, 0), again]).open_sessions() == set()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["connect", "disconnect"]),
            st.sampled_from([None, "a", "b"]),
            st.integers(1, 8),
        ),
        max_size=8,
    ),
    st.randoms(use_true_random=False),
)
def test_any_delivery_order_gives_the_state_of_time_order(
    events: list[tuple[str, str | None, int]], rnd: random.Random
) -> None:
    # The contract's promise the model relies on: ordering comes from event times, not from the
    # queue. Applying in any arrival order gives what applying in time order gives.
    ops = [
        (connect if kind == "connect" else disconnect)(float(t), 0, sid) for kind, sid, t in events
    ]
    rnd.shuffle(ops)
    arrived = UserState()
    for op in ops:
        apply(arrived, op)
    assert arrived.open_sessions() == replay(ops).open_sessions()


# ---------------------------------------------------------------------- the checker


def test_flags_a_200_long_after_the_logout() -> None:
    ops = [connect(1, 0.0), disconnect(2, 1.0)]
    late = 1.0 + REVOCATION_BOUND_S + 1
    assert verdicts(ops, [get(0.5, 200), get(late, 200)]) == ["wrong_200"]


def test_accepts_a_200_within_the_revocation_bound() -> None:
    ops = [connect(1, 0.0), disconnect(2, 1.0)]
    assert verdicts(ops, [get(1.0 + REVOCATION_BOUND_S - 0.5, 200)]) == []


def test_accepts_a_200_that_overlaps_the_login_and_refusals_at_any_time() -> None:
    # A login invoked during the request may already be applied; a 403 is never a wrong 200.
    ops = [connect(1, 5.0)]
    revoked = get(30, 401)
    revoked.reason = "revoked"  # the token fence: a refusal too
    assert verdicts(ops, [get(4.99, 200, took=0.05), get(30, 403), get(1, 503), revoked]) == []


def test_flags_a_200_before_any_login_and_odd_statuses() -> None:
    ops = [connect(1, 5.0)]
    assert verdicts(ops, [get(1.0, 200), get(6.0, 401), get(6.0, 500)]) == [
        "wrong_200",
        "bad_status",
        "bad_status",
    ]


def test_legal_interleaving_of_a_late_login_with_an_earlier_logout() -> None:
    # Published: logout (time 5) at instant 100, then an *older* login (time 3) at 101: while the
    # logout is not yet due the system may have applied the login alone, so a 200 is legal...
    ops = [connect(1, 90.0), disconnect(5, 100.0), connect(3, 101.0)]
    assert verdicts(ops, [get(101.5, 200)]) == []
    # ...and once the logout is due, both applied in time order refuse
    assert verdicts(ops, [get(100.0 + REVOCATION_BOUND_S + 1, 200)]) == ["wrong_200"]


def test_a_fault_extends_the_bound_until_recovery() -> None:
    faults = [Fault("pause_redis", 1.5, 20.0)]
    ops = [connect(1, 0.0), disconnect(2, 1.0)]
    during = [get(9.0, 200)]  # long after the logout, still within the fault's bound
    after = [get(20.0 + BOUNDS.recovery_s + BOUNDS.revocation_s + 1, 200)]
    assert verdicts(ops, during, faults) == []
    assert verdicts(ops, after, faults) == ["wrong_200"]
    assert deadline(1.01, faults, BOUNDS) == 20.0 + BOUNDS.recovery_s + BOUNDS.revocation_s
    assert deadline(None, faults, BOUNDS) == float("inf")


def test_sid_tokens_follow_their_own_session() -> None:
    ops = [connect(1, 0.0, "a"), connect(2, 0.0, "b"), disconnect(3, 1.0, "a")]
    later = 1.0 + REVOCATION_BOUND_S + 1
    assert verdicts(ops, [get(later, 200, "b"), get(later, 200)]) == []
    assert verdicts(ops, [get(later, 200, "a")]) == ["wrong_200"]


def test_idle_user_may_not_be_granted() -> None:
    ops = [connect(1, 0.0)]
    assert verdicts(ops, [get(5.0, 200), get(14.0, 200)]) == []  # each grant is activity
    idle = BOUNDS.idle_timeout_s + BOUNDS.idle_slack_s + 1
    assert verdicts(ops, [get(idle, 200)]) == ["wrong_200"]


def test_final_state_lost_logout_and_lost_login() -> None:
    checker = Checker(
        [connect(1, 0.0, "a"), disconnect(2, 1.0, "a"), connect(3, 2.0, "b")], [], [], BOUNDS
    )
    assert checker.check_final(U, PgUser("connected", {"b"}), 3.0) == []
    lost_logout = checker.check_final(U, PgUser("connected", {"a", "b"}), 3.0)
    assert [v.kind for v in lost_logout] == ["final_state"]
    assert "'a'" in lost_logout[0].message
    assert len(checker.check_final(U, None, 3.0)) == 1  # the user never reached PostgreSQL


def test_final_state_excuses_only_an_idle_expiry_of_a_silent_user() -> None:
    checker = Checker([connect(1, 0.0, "a")], [get(1.0, 200, "a")], [], BOUNDS)
    expired = PgUser("disconnected", ended_idle={"a"})
    assert checker.check_final(U, expired, 60.0) == []  # silent 59 s: expiry allowed
    assert len(checker.check_final(U, expired, 5.0)) == 1  # silent 4 s: it may not have expired
    assert len(checker.check_final(U, PgUser("disconnected"), 60.0)) == 1  # ended, not by expiry


# ---------------------------------------------------------------------- generation


def test_generation_is_deterministic_per_seed() -> None:
    assert history(7, 3, run="r") == history(7, 3, run="r")
    assert [history(7, i, run="r") for i in range(20)] != [
        history(8, i, run="r") for i in range(20)
    ]
    assert fault_plan(7, 2) == fault_plan(7, 2)
    kinds = {fault_plan(7, i).kind for i in range(4)}
    assert kinds == {"kill_worker", "restart_rabbitmq", "pause_redis", "stop_postgres"}


def test_untimed_histories_have_no_admin_late_or_idle_step() -> None:
    for i in range(200):
        h = history(11, i, run="r")
        if not h.timed:
            assert not {s.action for s in h.steps} & {"admin", "late", "idle"}
