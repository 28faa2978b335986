"""Thread stacks of a failed test's sessiond processes (``sessiond.stacks``: SIGUSR1).

A stall (events confirmed, consumers registered, nothing applied) leaves logs that say nothing;
the stacks say which call each thread waits on. Only processes that catch SIGUSR1 are signalled:
for the others (Dramatiq's parent process) its default action is to terminate."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from loadtests.harness import process_stats

FRAMES_PER_THREAD = 6
_THREAD = re.compile(r"^(Thread|Current thread) 0x[0-9a-f]+ \(most recent call first\):$")


def _session_pids(session: int) -> list[int]:
    return [pid for pid, fields in process_stats() if int(fields[3]) == session]


def _catches_sigusr1(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (signal.SIGUSR1 - 1) & 1)


def dump(session: int, log: Path, wait_s: float = 2.0) -> str:
    """Signals the session's processes, waits for their stacks in ``log`` and returns them,
    each thread cut to its innermost ``FRAMES_PER_THREAD`` frames."""
    start = log.stat().st_size
    signalled = [pid for pid in _session_pids(session) if _catches_sigusr1(pid)]
    for pid in signalled:
        os.kill(pid, signal.SIGUSR1)
    if not signalled:
        return "(no process of the session catches SIGUSR1)"
    time.sleep(wait_s)
    with log.open("rb") as handle:
        handle.seek(start)
        text = handle.read().decode(errors="replace")
    out, frames = [f"stacks of pids {signalled}:"], 0
    for line in text.splitlines():
        if _THREAD.match(line):
            out.append(line)
            frames = 0
        elif line.startswith("  File ") and frames < FRAMES_PER_THREAD:
            out.append(line)
            frames += 1
    return "\n".join(out)
