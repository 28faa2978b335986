"""Sanic's worker manager stops on SIGTERM from its monitor loop, not inside the signal handler.

Sanic 25.12's ``WorkerManager.shutdown_signal`` marks every worker terminated in the shared
worker-state dict, a ``multiprocessing`` manager proxy, from within the signal handler. Python
runs a handler between two bytecodes of the main thread, and that thread's monitor loop reads
the same proxy many times a second over the same connection. A SIGTERM that lands between the
loop's request and its reply makes the two calls read each other's replies: the loop gets the
handler's ``None`` and the manager dies with ``AttributeError`` and exit status 1, after the
workers were already told to stop. A CI run caught it on ``sessiond api``'s plain stop, and a
Kubernetes pod stop is the same signal.

Sanic already has the in-loop path: its monitor pipe's ``"__TERMINATE__"`` message, on which
the loop calls the same ``shutdown()`` on its next poll (every 0.1 s) and leaves the loop. The
handler now only sends that message. A second signal, once the loop has begun shutting down,
still kills the workers at once, as Sanic documents.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any, Final

from sanic.log import logger
from sanic.worker.manager import WorkerManager

TERMINATE: Final = "__TERMINATE__"
_original_shutdown_signal: Final[Any] = WorkerManager.shutdown_signal


def _deferred_shutdown_signal(self: WorkerManager, signum: int, frame: FrameType | None) -> None:
    if self._shutting_down:
        _original_shutdown_signal(self, signum, frame)
        return
    logger.info("Received signal %s. Shutting down.", signal.Signals(signum).name)
    self.monitor_publisher.send(TERMINATE)


def install() -> None:
    """Idempotent; every process that may become Sanic's main process calls it before serving."""
    WorkerManager.shutdown_signal = _deferred_shutdown_signal  # type: ignore[method-assign]
