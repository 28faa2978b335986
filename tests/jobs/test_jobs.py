"""The jobs as operators run them: ``sessiond sweep|flush`` by hand, and the scheduler feeding
real ``sessiond worker`` processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from sessiond.config import Settings
from storage import cache as cache_mod
from storage.activity import ActivityBuffer
from tests.conftest import ROOT, Amqp, Process, async_wait_until, cache_entry_when
from tests.jobs.conftest import connect_user, user_row

pytestmark = pytest.mark.integration


def cli(test_env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "sessiond.cli", *args],
        env={**test_env, "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def test_sweep_and_flush_by_hand(
    db: Settings,
    cache: cache_mod.Cache,
    buffer: ActivityBuffer,
    pg: asyncpg.Connection,
    test_env: dict[str, str],
) -> None:
    # Given an idle user, a recent one, and a request buffered for the recent one
    now = datetime.now(UTC)
    await connect_user(cache, "idle", now - timedelta(minutes=31))
    await connect_user(cache, "recent", now - timedelta(minutes=29))
    await buffer.touch("recent", at=now.timestamp())

    # When an operator previews, then sweeps, then flushes
    preview = cli(test_env, "sweep", "--dry-run")
    after_preview = await user_row(pg, "idle")
    swept = cli(test_env, "sweep")
    flushed = cli(test_env, "flush")

    # Then the preview names the idle user and changes nothing; the sweep expires exactly it
    assert (preview["job"], preview["users"], preview["dry_run"]) == ("expire_idle", ["idle"], True)
    assert after_preview["status"] == "connected"
    assert (swept["expired"], swept["users"]) == (1, ["idle"])
    assert swept["flushed"]["activity_entries"] == 1
    assert (await user_row(pg, "idle"))["status"] == "disconnected"
    assert (await user_row(pg, "recent"))["last_activity_at"] is not None
    assert flushed["job"] == "flush_activity" and flushed["skipped"] is False


@pytest.mark.slow
async def test_scheduler_and_workers_flush_and_expire(
    db: Settings,
    cache: cache_mod.Cache,
    buffer: ActivityBuffer,
    pg: asyncpg.Connection,
    broker_client: Amqp,
    spawn: Callable[..., Process],
) -> None:
    # Given an idle timeout of one minute, a user silent for two and one who just made a request
    env = {
        "SESSIOND_IDLE_TIMEOUT_S": "60",
        "SESSIOND_ACTIVITY_FLUSH_S": "0.5",
        "SESSIOND_EXPIRY_PERIOD_S": "1",
        "SESSIOND_LOG_LEVEL": "INFO",
    }
    now = datetime.now(UTC)
    await connect_user(cache, "silent", now - timedelta(minutes=2))
    await connect_user(cache, "active", now - timedelta(minutes=2))
    await buffer.touch("active", at=now.timestamp())

    # When a worker and the scheduler run
    worker = spawn("worker", "--processes", "1", "--threads", "2", env=env)
    scheduler = spawn("scheduler", env=env)

    async def expired() -> bool:
        return bool((await user_row(pg, "silent"))["status"] == "disconnected")

    started = time.monotonic()
    await async_wait_until(expired, timeout=60)

    # Then the silent user is expired and evicted, the active one stays with its activity flushed
    assert time.monotonic() - started < 60
    active = await user_row(pg, "active")
    assert active["status"] == "connected"
    assert active["last_activity_at"] is not None
    assert abs((active["last_activity_at"] - now).total_seconds()) < 1e-3
    assert await cache_entry_when(cache.client, "silent", lambda e: e is None) is None
    assert await cache.client.exists("user:active") == 1
    audit = await pg.fetch("SELECT user_id, reason FROM audit_events WHERE kind = 'expired'")
    assert [(a["user_id"], a["reason"]) for a in audit] == [("silent", "idle_timeout")]
    assert worker.alive() and scheduler.alive(), worker.output()[-3000:]
    assert scheduler.stop() == 0
    # SIGTERM to Dramatiq's main process only, as Kubernetes does to PID 1 (a second SIGTERM
    # sent to the whole process group makes Dramatiq kill its worker process instead).
    os.kill(worker.proc.pid, signal.SIGTERM)
    assert worker.proc.wait(30) == 0, worker.output()[-3000:]
