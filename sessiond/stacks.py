"""``kill -USR1 <pid>`` makes a sessiond process write every thread's stack to its log.

A worker that stops applying events while its consumers look healthy to RabbitMQ is a thread
waiting on something; which call it waits on is the one fact its logs cannot give. Python's
``faulthandler`` writes the stacks from the signal handler itself, without the GIL-holding thread's
help, so it answers even when that thread is the one stuck. Nothing else uses SIGUSR1 here (Dramatiq
and Sanic handle INT, TERM and HUP).
"""

from __future__ import annotations

import faulthandler
import signal
import sys


def dump_on_sigusr1() -> None:
    """Idempotent. To the process's original standard error (file descriptor 2), not
    ``sys.stderr``: Dramatiq replaces that in its worker processes with a pipe of framed log
    records, which raw bytes would corrupt; fd 2 is the log the operator reads."""
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__ or sys.stderr, all_threads=True)
