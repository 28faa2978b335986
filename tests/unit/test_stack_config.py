"""The local stack's layout and the environment it hands to processes and tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from sessiond.config import Settings
from sessiond.stack import StackConfig


def test_ports_and_directory_from_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SESSIOND_STACK_DIR", str(tmp_path / "s"))
    monkeypatch.setenv("SESSIOND_STACK_REDIS_PORT", "6400")
    monkeypatch.setenv("SESSIOND_STACK_AMQPS_PORT", "5999")
    cfg = StackConfig.from_env()
    assert cfg.root == tmp_path / "s"
    assert cfg.redis_port == 6400
    assert cfg.pidfile("redis") == tmp_path / "s" / "redis.pid"
    assert cfg.env_dict()["SESSIOND_AMQP_URL"].endswith(":5999/sessiond")


def test_env_reaches_the_stack_over_tls_and_separates_tests(tmp_path: Path) -> None:
    cfg = StackConfig(root=tmp_path)
    dev, test = cfg.env_dict(), cfg.env_dict(test=True)
    assert dev["SESSIOND_AMQP_URL"].startswith("amqps://")
    assert dev["SESSIOND_AMQP_CA_FILE"] == str(tmp_path / "tls" / "ca.pem")
    assert dev["SESSIOND_DATABASE_URL"].endswith("/sessiond")
    assert test["SESSIOND_DATABASE_URL"].endswith("/sessiond_test")
    assert dev["SESSIOND_REDIS_URL"].endswith("/0") and test["SESSIOND_REDIS_URL"].endswith("/15")
    assert test["SESSIOND_AMQP_URL"].endswith("/sessiond_test")
    # 127.0.0.1, never localhost: clients would try ::1 first (nothing listens there) and log a
    # refused connection at error level; the broker's certificate names IP:127.0.0.1 too
    assert all("localhost" not in url for url in {**dev, **test}.values())
    # the settings object accepts exactly what the stack hands out
    s = Settings.model_validate({k.removeprefix("SESSIOND_").lower(): v for k, v in dev.items()})
    assert s.amqp_is_tls


def test_env_lines_are_shell_exports(tmp_path: Path) -> None:
    lines = StackConfig(root=tmp_path).env_lines()
    assert all(line.startswith("export SESSIOND_") and "=" in line for line in lines)
    assert len(lines) == 4
