"""Sanic's manager, on SIGTERM, leaves the shared worker state alone inside the handler."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from sanic.worker.constants import ProcessState
from sanic.worker.manager import MonitorCycle, WorkerManager

from api import graceful_stop


class WatchedState(dict[str, Any]):
    """The manager's worker-state dict, counting the reads and writes made while watched."""

    watching = False
    touches = 0

    def __getitem__(self, key: str) -> Any:
        if self.watching:
            self.touches += 1
        return super().__getitem__(key)

    def __setitem__(self, key: str, value: Any) -> None:
        if self.watching:
            self.touches += 1
        super().__setitem__(key, value)


class Running:
    """A worker's process as the manager sees it: alive, with a pid that may be signalled."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.pid = proc.pid
        self.proc = proc

    def is_alive(self) -> bool:
        return self.proc.poll() is None


def deliver(signum: int) -> None:
    """Runs the handler the manager installed, as the interpreter would on that signal."""
    handler = signal.getsignal(signum)
    assert callable(handler)
    handler(signum, None)


@pytest.fixture
def manager() -> Iterator[tuple[WorkerManager, WatchedState]]:
    graceful_stop.install()
    state = WatchedState()
    subscriber, publisher = multiprocessing.Pipe(duplex=False)
    context = multiprocessing.get_context("spawn")
    mgr = WorkerManager(1, lambda **_: None, {}, context, (publisher, subscriber), state)
    sleeper = subprocess.Popen(["sleep", "30"])
    for worker in mgr.workers:
        for process in worker.processes:
            process._current_process = Running(sleeper)
    yield mgr, state
    sleeper.kill()
    sleeper.wait()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_the_signal_handler_only_asks_the_monitor_loop_to_stop(
    manager: tuple[WorkerManager, WatchedState],
) -> None:
    mgr, state = manager
    state.watching = True
    deliver(signal.SIGTERM)
    assert state.touches == 0
    assert not mgr._shutting_down
    # The loop's next poll does the shutdown Sanic's handler did, and leaves the loop.
    assert mgr._poll_monitor() is MonitorCycle.BREAK
    assert mgr._shutting_down
    assert state.touches > 0
    assert all(p.state is ProcessState.TERMINATED for p in mgr.processes)


def test_a_second_signal_once_stopping_still_kills(
    manager: tuple[WorkerManager, WatchedState], monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr, _ = manager
    killed: list[bool] = []
    monkeypatch.setattr(mgr, "kill", lambda: killed.append(True))
    deliver(signal.SIGTERM)
    mgr._poll_monitor()
    deliver(signal.SIGTERM)
    assert killed == [True]
