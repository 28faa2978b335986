"""Thread stacks and TCP connections of a failed test's sessiond processes.

A stall (events confirmed, consumers registered, nothing applied) leaves logs that say nothing;
the stacks (``sessiond.stacks``: SIGUSR1) say which call each thread waits on, and the connection
list says which process holds which client port, the one thing a broker's channel list
(``127.0.0.1:<port> -> ...``, with its unacknowledged counts) knows of its client. Only processes
that catch SIGUSR1 are signalled: for the others (Dramatiq's parent process) its default action
is to terminate."""

from __future__ import annotations

import contextlib
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


def _tcp_peers() -> dict[str, tuple[int, int]]:
    """Socket inode to (local port, remote port), for every TCP connection here to a listening
    port: a client's connections to servers, not pika's loopback wake-up pairs."""
    rows: list[list[str]] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            rows += [row.split() for row in Path(table).read_text().splitlines()[1:]]

    def port(address: str) -> int:
        return int(address.rsplit(":", 1)[1], 16)

    listening = {port(f[1]) for f in rows if f[3] == "0A"}
    return {
        f[9]: (port(f[1]), port(f[2])) for f in rows if f[3] != "0A" and port(f[2]) in listening
    }


def connections(session: int) -> str:
    """Each process of the session with its connected TCP sockets, as ``local->remote`` ports."""
    peers, out = _tcp_peers(), ["tcp connections by pid (local->remote port):"]
    for pid in _session_pids(session):
        ports: list[str] = []
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:[") and target[8:-1] in peers:
                        local, remote = peers[target[8:-1]]
                        ports.append(f"{local}->{remote}")
        out.append(f"pid {pid}: {' '.join(sorted(ports)) or '-'}")
    return "\n".join(out)


def report(session: int, log: Path) -> str:
    """What a failed test prints of one spawned process's session: stacks, then connections."""
    return dump(session, log) + "\n" + connections(session)
