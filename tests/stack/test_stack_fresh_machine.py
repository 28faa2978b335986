"""The local stack as a new user meets it (issue 17): a clone in a directory the ``postgres``
user cannot reach, a start that fails, listeners, a second bootstrap. Real servers and tools."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.harness import free_port
from sessiond import stack
from sessiond.stack import postgres, rabbitmq

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


@pytest.fixture
def private_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory like /root/sessiond on Debian: its parent is mode 0700."""
    parent = tmp_path / "home"
    parent.mkdir(mode=0o700)
    parent.chmod(0o700)
    yield parent / "sessiond" / ".stack"


def forget(cfg: stack.StackConfig) -> None:
    base = postgres.home(cfg)
    if base != cfg.root:
        shutil.rmtree(base, ignore_errors=True)


def test_postgres_runs_although_the_stack_directory_is_out_of_its_reach(
    private_dir: Path,
) -> None:
    # Given a stack directory that the postgres user cannot traverse (we run as root)
    assert os.geteuid() == 0, "the suite runs as root, as scripts/test does on Debian"
    cfg = stack.StackConfig(root=private_dir, pg_port=free_port())
    stack.start(cfg, "postgres")
    try:
        # Then the cluster lives under /var/lib/sessiond, recorded in the stack directory
        base = postgres.home(cfg)
        assert base.parent == postgres.VAR_BASE
        assert (private_dir / "postgres.location").read_text().strip() == str(base)
        assert (base / "postgres" / "PG_VERSION").exists()
        assert stack.running(cfg, "postgres")
        assert stack.logfile(cfg, "postgres") == base / "postgres.log"
        assert cfg.logfile("postgres") == base / "postgres.log"
        assert cfg.dir("postgres") == base / "postgres"  # what tests and tools look up
        # and the user's directories were left as they were
        assert (private_dir.parent.parent.stat().st_mode & 0o777) == 0o700
        # and a second start finds the same cluster
        stack.start(cfg, "postgres")
        assert postgres.home(cfg) == base
    finally:
        stack.stop(cfg, "postgres")
        forget(cfg)
    assert not stack.running(cfg, "postgres")


def test_postgres_stays_in_a_reachable_stack_directory(tmp_path: Path) -> None:
    # Given a stack directory postgres can traverse, then the data stays in it
    reachable = Path("/var/tmp") / f"sessiond-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        reachable.mkdir(mode=0o755)
        cfg = stack.StackConfig(root=reachable)
        assert postgres.choose_home(cfg, postgres.pg_user()) == reachable
        assert not (reachable / "postgres.location").exists()
    finally:
        shutil.rmtree(reachable, ignore_errors=True)


def test_a_failed_start_is_one_line_naming_the_server_and_its_log(private_dir: Path) -> None:
    # Given PostgreSQL's port already taken by something else
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = {
            **os.environ,
            "SESSIOND_STACK_DIR": str(private_dir),
            "SESSIOND_STACK_PG_PORT": str(port),
        }
        # When the stack is brought up
        result = subprocess.run(
            [sys.executable, "-m", "sessiond.cli", "stack", "up", "--no-install"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    cfg = stack.StackConfig(root=private_dir, pg_port=port)
    try:
        # Then it fails with exactly one error line that says which server and where to look
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        entry = json.loads(lines[0])
        assert entry["level"] == "error"
        assert entry["server"] == "postgres"
        assert entry["log"] == str(stack.logfile(cfg, "postgres"))
        assert entry["msg"].startswith("postgres: ") and entry["log"] in entry["msg"]
        assert "Traceback" not in result.stderr + result.stdout
        # and the log it names says why
        assert "could not" in Path(entry["log"]).read_text().lower()
        # and nothing else was started after the failure
        assert not (private_dir / "redis.pid").exists()
    finally:
        stack.stop(cfg, "postgres")
        forget(cfg)


def test_every_listener_of_the_stack_is_on_loopback(stack_config: stack.StackConfig) -> None:
    # Given the running stack, then each of its ports, the Erlang distribution and epmd included,
    # listens on 127.0.0.1 only
    cfg = stack_config
    ports = {cfg.amqp_port, cfg.amqps_port, cfg.mgmt_port, cfg.dist_port, cfg.redis_port,
             cfg.pg_port, 4369}  # fmt: skip
    out = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
    seen: dict[int, set[str]] = {}
    for line in out.splitlines():
        local = line.split()[3]
        host, _, number = local.rpartition(":")
        if int(number) in ports:
            seen.setdefault(int(number), set()).add(host)
    assert set(seen) == ports, f"not listening: {ports - set(seen)}"
    for port, hosts in seen.items():
        assert hosts <= {"127.0.0.1", "[::1]"}, f"port {port} listens on {hosts}"


def test_epmd_is_left_alone_while_a_node_uses_it(stack_config: stack.StackConfig) -> None:
    # Given our RabbitMQ node registered with epmd, then the idle-epmd stop refuses
    assert stack.running(stack_config, "rabbitmq")
    assert rabbitmq.stop_idle_epmd() is False
    names = subprocess.run(
        ["epmd", "-names"], capture_output=True, text=True, timeout=10, check=False
    )
    assert names.returncode == 0 and "up and running" in names.stdout


def test_a_second_bootstrap_installs_nothing() -> None:
    # Given the checkout installed (the suite runs from it), when bootstrap runs again
    started = time.monotonic()
    result = subprocess.run(
        [str(REPO / "scripts" / "bootstrap")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # Then it succeeds quickly and silently: no apt, no pip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert time.monotonic() - started < 30
