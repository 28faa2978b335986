"""The test servers' ports come from outside the kernel's ephemeral range, where the suite's own
outgoing connections take theirs (``loadtests.harness.free_port``)."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from loadtests import harness
from loadtests.harness import _ephemeral_range, free_port


def test_a_free_port_is_outside_the_ephemeral_range_and_bindable() -> None:
    low, high = _ephemeral_range()
    for _ in range(20):
        port = free_port(span=2)
        assert not (low <= port + 1 and port <= high), (port, low, high)
        with ExitStack() as held:
            for p in (port, port + 1):
                sock = held.enter_context(socket.socket())
                sock.bind(("127.0.0.1", p))
                sock.listen()


def test_a_taken_port_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", free_port()))
        squatter.listen()
        taken = squatter.getsockname()[1]
        spare = free_port()
        draws: Iterator[int] = iter([taken, taken, spare])

        class Drawn:
            def randint(self, first: int, last: int) -> int:
                return next(draws)

        monkeypatch.setattr(random, "SystemRandom", Drawn)  # what harness draws from
        assert harness.free_port() == spare
