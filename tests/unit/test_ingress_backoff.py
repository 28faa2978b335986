"""The ingress restarts after any failure with a growing delay, so that a message or a bug that
fails every time costs a retry now and then, not a busy loop (issue 11)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pika.exceptions

from actors.ingress import Ingress
from actors.stamping import ReceiptsUnavailable
from sessiond.config import Settings
from storage.receipts import Receipt, Settled


class Recorder(threading.Event):
    """Records each pause the ingress takes, and stops it after ``limit`` of them."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.pauses: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.pauses.append(float(timeout or 0))
        if len(self.pauses) >= self.limit:
            self.set()
        return self.is_set()


def unreachable(_batch: list[Receipt], _settled: Callable[[str], Settled]) -> dict[str, Receipt]:
    raise ReceiptsUnavailable("never called: _consume fails first")


class Failing(Ingress):
    def __init__(
        self,
        stopping: Recorder,
        *,
        commits: frozenset[int] = frozenset(),
        error: Exception | None = None,
    ) -> None:
        super().__init__(Settings(), [], unreachable)
        self.stopping = stopping
        self.commits = commits
        self.error = error or RuntimeError("a bug that fails every time")
        self.calls = 0

    def _consume(self) -> None:
        self.calls += 1
        self._committed = self.calls in self.commits
        raise self.error


def test_restarts_back_off_exponentially_up_to_15_s() -> None:
    stopping = Recorder(limit=8)
    Failing(stopping).run()
    assert stopping.pauses == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]


def test_a_session_that_committed_starts_the_backoff_again() -> None:
    stopping = Recorder(limit=5)
    Failing(stopping, commits=frozenset({3})).run()
    assert stopping.pauses == [0.5, 1.0, 0.5, 1.0, 2.0]


def test_an_unreachable_broker_is_retried_every_2_s_at_most() -> None:
    # Events published as soon as RabbitMQ is back wait in the ingest queue for as long as the
    # ingress still sleeps: after a 30 s outage a 15 s pause made them 15 s late.
    stopping = Recorder(limit=6)
    Failing(stopping, error=pika.exceptions.AMQPConnectionError("refused")).run()
    assert stopping.pauses == [0.5, 1.0, 2.0, 2.0, 2.0, 2.0]


def test_a_bug_after_an_outage_backs_off_further() -> None:
    class Mixed(Failing):
        def _consume(self) -> None:
            self.calls += 1
            if self.calls <= 4:
                raise pika.exceptions.AMQPConnectionError("refused")
            raise RuntimeError("a bug that fails every time")

    stopping = Recorder(limit=7)
    Mixed(stopping).run()
    assert stopping.pauses == [0.5, 1.0, 2.0, 2.0, 2.0, 4.0, 8.0]


def test_postgresql_unreachable_for_first_receipts_is_retried_every_2_s_at_most() -> None:
    # The batch is rolled back and read again: it waits in the ingest queue meanwhile
    stopping = Recorder(limit=5)
    Failing(stopping, error=ReceiptsUnavailable("connection refused")).run()
    assert stopping.pauses == [0.5, 1.0, 2.0, 2.0, 2.0]
