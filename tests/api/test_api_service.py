"""Probes, metrics, OpenAPI, JSON errors, and the API run the way operators run it."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from loadtests.harness import free_port
from tests.api.conftest import Api, ApiFactory, http, mint
from tests.conftest import Process, wait_until

pytestmark = pytest.mark.integration


async def test_health(api: Api) -> None:
    live = await api.get("/health/live")
    assert (live.status, live.json()) == (200, {"status": "ok"})
    ready = await api.get("/health/ready")
    assert ready.status == 200
    assert ready.json()["checks"] == {"postgres": "ok", "redis": "ok"}


async def test_ready_names_the_dependency_that_is_down(api_factory: ApiFactory) -> None:
    # Redis on a port where nothing listens
    api = await api_factory(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    reply = await api.get("/health/ready")
    assert reply.status == 503
    assert reply.json() == {
        "status": "unavailable",
        "checks": {"postgres": "ok", "redis": "down"},
        "down": ["redis"],
    }
    # A protected route decides from PostgreSQL, the source of truth: user "1" is unknown there
    check = await api.get("/auth/check", token=mint("1"))
    assert (check.status, check.json()) == (403, {"error": "forbidden", "reason": "not_connected"})


async def test_metrics(api: Api) -> None:
    await api.event("connected", "1")
    await api.get("/auth/check", token=mint("1"))
    await api.get("/auth/check", token=mint("2"))
    await api.get("/auth/check", token="bad")
    reply = await api.get("/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = reply.body.decode()
    decisions = "sessiond_access_decisions_total"
    assert f'{decisions}{{route="/auth/check",decision="granted",reason=""}} 1' in text
    assert (
        f'{decisions}{{route="/auth/check",decision="forbidden",reason="not_connected"}} 1' in text
    )
    assert (
        f'{decisions}{{route="/auth/check",decision="invalid_token",reason="malformed"}} 1' in text
    )
    assert 'sessiond_user_cache_total{result="hit"} 1' in text
    assert 'sessiond_user_cache_total{result="miss"} 1' in text
    assert 'sessiond_request_duration_seconds_count{route="/auth/check"} 3' in text
    assert re.search(
        r'sessiond_request_duration_seconds_bucket\{route="/auth/check",le="\+Inf"\} 3', text
    )


async def test_openapi_document(api: Api) -> None:
    reply = await api.get("/docs/openapi.json")
    assert reply.status == 200
    doc = reply.json()
    assert doc["openapi"].startswith("3.")
    for path in ("/auth/check", "/api/me", "/admin/users", "/admin/users/{user_id}",
                 "/admin/users/{user_id}/disconnect", "/health/ready", "/metrics"):  # fmt: skip
        assert path in doc["paths"], path
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_errors_are_json(api: Api) -> None:
    missing = await api.get("/no/such/route")
    assert (missing.status, missing.json()) == (404, {"error": "not_found"})
    assert missing.headers["Content-Type"] == "application/json"
    wrong = await api.post("/api/me")
    assert (wrong.status, wrong.json()) == (405, {"error": "method_not_allowed"})


async def test_unexpected_error_is_500_with_a_logged_request_id(
    api: Api, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def boom(*args: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(api.app.ctx.access, "authorize", boom)
    with caplog.at_level(logging.ERROR, logger="api.errors"):
        reply = await api.get("/api/me", token=mint("1"))
    assert reply.status == 500
    body = reply.json()
    assert body["error"] == "internal" and body["request_id"]
    assert b"secret internals" not in reply.body and b"<html" not in reply.body.lower()
    logged = [r for r in caplog.records if getattr(r, "request_id", None) == body["request_id"]]
    assert logged and logged[0].exc_info is not None


async def test_api_process_with_two_workers(
    spawn: Callable[..., Process], migrated: object, cache: object, tmp_path: Path
) -> None:
    """``sessiond api --workers 2``: Sanic's multi-worker mode, the factory run in each worker."""
    port = free_port()
    # A previous run's metrics left in the directory must not count
    (tmp_path / "4242.json").write_text(
        '{"sessiond_access_decisions_total": [[["x", "y", "z"], 7]]}'
    )
    env = {"SESSIOND_LOG_LEVEL": "INFO", "SESSIOND_METRICS_DIR": str(tmp_path)}
    proc = spawn("api", "--workers", "2", "--port", str(port), env=env)
    url = f"http://127.0.0.1:{port}"

    def both_workers_ready() -> bool:
        assert proc.alive(), proc.output()
        return proc.output().count("Worker ready") == 2

    wait_until(both_workers_ready, timeout=60)
    assert http(url + "/health/ready").status == 200
    for _ in range(10):  # each lands on one worker or the other; all answer alike
        reply = http(url + "/auth/check", token=mint("nobody"))
        assert (reply.status, reply.json()["reason"]) == (403, "not_connected")
    assert http(url + "/auth/check").status == 401

    # Every scrape reports both workers' decisions, whichever worker answers it
    refused = 'decision="forbidden",reason="not_connected"} 10'
    invalid = 'decision="invalid_token",reason="missing"} 1'

    def scrapes_agree() -> bool:
        bodies = [http(url + "/metrics").body.decode() for _ in range(6)]
        return all(refused in b and invalid in b for b in bodies)

    wait_until(scrapes_agree, timeout=10)
    assert len(list(tmp_path.glob("*.json"))) == 2  # one per worker, the stale one gone
    assert 'route="x"' not in http(url + "/metrics").body.decode()
    # SIGTERM to the main process only, as Kubernetes does: workers drain and close cleanly.
    # Sanic 25.12's main process hangs on a SIGTERM within ~1 s of "Worker ready" (seen with a
    # bare Sanic app too), hence the pause.
    await asyncio.sleep(1.5)
    os.kill(proc.proc.pid, signal.SIGTERM)
    try:
        assert proc.proc.wait(30) == 0
    except subprocess.TimeoutExpired:
        raise AssertionError(proc.output()) from None
    proc.stop()
    assert "Traceback" not in proc.output(), proc.output()
    assert '"level": "error"' not in proc.output(), proc.output()
