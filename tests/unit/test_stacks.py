"""A failed test's report gets the stacks of the processes that catch SIGUSR1, and only theirs,
and the client ports each process of the session holds."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests import stacks

PROGRAM = """
import subprocess, time
from sessiond.stacks import dump_on_sigusr1
dump_on_sigusr1()
bystander = subprocess.Popen(["sleep", "30"])  # same session, default SIGUSR1 action
print(bystander.pid, flush=True)
def wait_here():
    time.sleep(30)
wait_here()
"""


def test_the_stacks_name_the_waiting_call_and_spare_other_processes(tmp_path: Path) -> None:
    log = tmp_path / "proc.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", PROGRAM], stdout=subprocess.PIPE, stderr=out,
            start_new_session=True,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        bystander = int(proc.stdout.readline())
        time.sleep(0.2)
        text = stacks.dump(proc.pid, log, wait_s=0.5)
        assert f"pids [{proc.pid}]" in text
        assert "in wait_here" in text
        assert proc.poll() is None  # the dump does not stop the process
        # nor one that does not catch the signal (killed, it would be a zombie of the first)
        assert Path(f"/proc/{bystander}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    finally:
        with contextlib.suppress(NameError, ProcessLookupError):
            os.kill(bystander, signal.SIGKILL)
        proc.kill()
        proc.wait()


def test_the_connections_name_each_process_and_its_client_port(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        program = (
            f"import socket, time; s = socket.create_connection(('127.0.0.1', {port}));"
            " print(s.getsockname()[1], flush=True); time.sleep(30)"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", program], stdout=subprocess.PIPE, start_new_session=True
        )
        try:
            assert proc.stdout is not None
            client_port = int(proc.stdout.readline())
            text = stacks.connections(proc.pid)
            assert f"pid {proc.pid}: {client_port}->{port}" in text.splitlines()
        finally:
            proc.kill()
            proc.wait()
