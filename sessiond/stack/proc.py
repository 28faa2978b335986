"""Running the servers' own tools, waiting for ports and pid files: the stack's plumbing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class StackError(RuntimeError):
    """A server would not start or stop.

    ``str()`` is one line naming the server, what went wrong and the log file to read: that line
    is all a user sees (no traceback), so it has to be enough to act on.
    """

    def __init__(
        self, server: str, problem: str | None = None, logfile: Path | None = None
    ) -> None:
        if problem is None:  # a whole message, as callers outside the stack raise it
            server, problem = server.split(" ", 1)[0] or "stack", server
            text = problem
        else:
            text = f"{server}: {problem}" + (f"; see {logfile}" if logfile else "")
        self.server, self.problem, self.logfile = server, problem, logfile
        super().__init__(text)


def _one_line(text: str, limit: int = 300) -> str:
    """The last meaningful line of a tool's stderr: the one that says why."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line[:limit]


def run(
    cmd: list[str],
    *,
    server: str,
    logfile: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    user: str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Runs a server's tool; a failure becomes a one-line ``StackError`` about ``server``."""
    if user is not None and os.geteuid() == 0:
        cmd = ["runuser", "-u", user, "--", *cmd]
    try:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise StackError(server, f"{Path(cmd[0]).name} took over {timeout:.0f}s", logfile) from exc
    except OSError as exc:
        raise StackError(server, f"cannot run {cmd[0]}: {exc.strerror}", logfile) from exc
    if check and result.returncode != 0:
        why = _one_line(result.stderr) or _one_line(result.stdout)
        tool = Path(cmd[0]).name if cmd[0] != "runuser" else Path(cmd[4]).name
        raise StackError(server, f"{tool} failed ({result.returncode}): {why}", logfile)
    return result


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait(check: Callable[[], bool], what: str, timeout: float, logfile: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise StackError(what, f"not ready after {timeout:.0f}s", logfile)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    return pid if pid_alive(pid) else None


def kill_pidfile(pidfile: Path, timeout: float = 20) -> None:
    pid = read_pid(pidfile)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
