"""The command line's shape (CONTRACT §6) and the commands it builds for child processes."""

from __future__ import annotations

import jwt
import pytest

from sessiond import cli


def test_every_contract_command_parses() -> None:
    p = cli.build_parser()
    for argv in (
        ["stack", "up"],
        ["stack", "down"],
        ["stack", "status"],
        ["stack", "env"],
        ["migrate"],
        ["api", "--workers", "2", "--host", "127.0.0.1", "--port", "8001"],
        ["worker", "--processes", "2", "--threads", "4", "--partitions", "0,3"],
        ["scheduler"],
        ["run"],
        ["dlq", "list"],
        ["dlq", "replay"],
        ["sweep", "--dry-run"],
        ["flush"],
        ["token", "--sub", "42", "--sid", "s", "--roles", "admin", "--ttl", "60"],
        ["publish", "connected", "42", "--name", "N", "--email", "e@x", "--session", "s"],
        ["publish", "disconnected", "42"],
    ):
        assert callable(p.parse_args(argv).func)


def test_worker_partitions_become_queues() -> None:
    argv = cli.worker_argv(2, 4, "0,3")
    assert argv[argv.index("--queues") + 1 :] == [
        "sessiond.events.p0",
        "sessiond.events.p3",
        "sessiond.jobs",
    ]
    assert "--queues" not in cli.worker_argv(2, 4, None)


def test_api_runs_the_sanic_factory() -> None:
    argv = cli.api_argv(3, "127.0.0.1", 8123)
    assert "api.app:create_app" in argv and "--factory" in argv
    assert argv[argv.index("--workers") + 1] == "3"


def test_token_is_verifiable_with_the_configured_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sessiond.config import get_settings

    monkeypatch.setenv("SESSIOND_JWT_SECRET", "unit-test-secret-with-enough-length!")
    get_settings.cache_clear()
    try:
        assert cli.main(["token", "--sub", "42", "--sid", "phone", "--roles", "admin"]) == 0
    finally:
        get_settings.cache_clear()
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, "unit-test-secret-with-enough-length!", algorithms=["HS256"])
    assert (claims["sub"], claims["sid"], claims["roles"]) == ("42", "phone", ["admin"])
    assert claims["exp"] - claims["iat"] == 3600
