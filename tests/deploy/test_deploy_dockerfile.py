"""The Dockerfile, checked as text (no Docker engine here), and its dev wrapper run for real."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ._support import REPO

pytestmark = pytest.mark.deploy

DOCKERFILE = (REPO / "Dockerfile").read_text()


def _stages() -> dict[str, list[str]]:
    """Instructions of each stage, by stage name (heredoc bodies skipped)."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    heredoc: str | None = None
    for line in DOCKERFILE.splitlines():
        if heredoc:
            heredoc = None if line == heredoc else heredoc
            continue
        if match := re.match(r"FROM (\S+) AS (\S+)$", line):
            current = stages.setdefault(match[2], [f"FROM {match[1]}"])
        elif line and not line.startswith((" ", "#")):
            current.append(line)
            if match := re.search(r"<<'?(\w+)'?", line):
                heredoc = match[1]
    return stages


def _wrapper(tmp: Path) -> Path:
    match = re.search(r"<<'WRAPPER' /usr/local/bin/tilt-run\n(.*?)\nWRAPPER\n", DOCKERFILE, re.S)
    assert match, "the dev stage defines tilt-run in a heredoc"
    script = tmp / "tilt-run"
    script.write_text(match[1] + "\n")
    script.chmod(0o755)
    return script


def test_base_image_pinned_and_final_stage_is_runtime() -> None:
    stages = _stages()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+$", DOCKERFILE, re.M)
    assert list(stages)[-1] == "runtime"  # `docker build .` gives the production image
    assert stages["runtime"] == ["FROM runtime-base"]
    assert stages["builder"][0] == stages["runtime-base"][0] == "FROM ${PYTHON_IMAGE}"


def test_runtime_has_no_build_tools_and_runs_unprivileged() -> None:
    runtime = "\n".join(_stages()["runtime-base"])
    assert not re.search(r"apt-get|apk |gcc|build-essential|pip install", runtime)
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    assert re.search(r"^ARG APP_UID=10001$", runtime, re.M)
    assert re.search(r"^USER \$\{APP_UID\}:\$\{APP_UID\}$", runtime, re.M)
    assert 'ENTRYPOINT ["sessiond"]' in runtime and 'CMD ["api"]' in runtime


def test_builder_uses_a_venv_and_installs_the_project() -> None:
    builder = "\n".join(_stages()["builder"])
    assert "python -m venv /opt/venv" in builder
    assert re.search(r"^RUN pip install \.$", builder, re.M)


def test_dockerignore_allows_exactly_what_is_copied() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :][0] == "*" and "*" in ignore[:3]  # allow-list style
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = {
        src.rstrip("/")
        for line in DOCKERFILE.splitlines()
        if line.startswith("COPY ") and "--from=" not in line and "<<" not in line
        for src in line.split()[1:-1]
    }
    assert copied == allowed
    assert [c for c in copied if not (REPO / c).exists()] == []


def test_wrapper_passes_the_exit_status_through(tmp_path: Path) -> None:
    wrapper = _wrapper(tmp_path)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run([str(wrapper), "sh", "-c", "exit 3"], env=env, timeout=10, check=False)
    assert result.returncode == 3


def test_wrapper_restarts_in_place_and_forwards_sigterm(tmp_path: Path) -> None:
    # Given a long-running command under the wrapper, logging each start and its SIGTERM
    wrapper = _wrapper(tmp_path)
    log = tmp_path / "log"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    child = (
        f"echo start >> {log}; trap 'echo term >> {log}; exit 0' TERM; while :; do sleep 0.1; done"
    )
    proc = subprocess.Popen([str(wrapper), "sh", "-c", child], env=env)
    try:
        _wait_for(lambda: log.exists() and log.read_text().count("start") == 1)
        # When Tilt asks for a restart
        subprocess.run([str(wrapper), "--restart"], env=env, timeout=10, check=True)
        # Then the command runs again, in the same wrapper
        _wait_for(lambda: log.read_text().count("start") == 2)
        assert proc.poll() is None
        # When the pod is stopped; Then the command gets SIGTERM and the wrapper exits with it
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert log.read_text().split() == ["start", "term", "start", "term"]
    finally:
        if proc.poll() is None:
            proc.kill()


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail("condition not met in time")
