"""The scheduler SIGKILLed mid-tick, again and again, with two replicas: every idle user is still
expired exactly once, no tick is enqueued twice, and the ticks go on after each restart."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from sessiond.config import Settings
from tests.conftest import Process
from tests.faults._support import WORKER_ARGS, WORKER_ENV, Figure, fetchval, publish

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PERIOD_S = 1.0
JOB_ENV = {
    **WORKER_ENV,
    "SESSIOND_EXPIRY_PERIOD_S": str(PERIOD_S),
    "SESSIOND_ACTIVITY_FLUSH_S": str(PERIOD_S),
    "SESSIOND_IDLE_TIMEOUT_S": "1800",
}


def idle_wave(wave: int, users: int) -> list[dict[str, object]]:
    """Users who connected two hours ago and were never seen since: the next sweep's work."""
    at = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    return [
        {"event": "connected", "user_id": f"idle-{wave}-{u}", "session_id": "s",
         "event_id": f"idle-{wave}-{u}", "occurred_at": at}
        for u in range(users)
    ]  # fmt: skip


def kill_at_next_tick(proc: Process) -> None:
    """SIGKILL just after a tick boundary, while the replica claims the tick and enqueues it."""
    now = time.time()
    boundary = math.ceil(now / PERIOD_S) * PERIOD_S
    time.sleep(max(0.0, boundary - now) + 0.003)
    os.killpg(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait(10)


def enqueued_ticks(procs: list[Process]) -> Counter[tuple[str, int]]:
    ticks: Counter[tuple[str, int]] = Counter()
    for proc in procs:
        for line in proc.output().splitlines():
            if '"tick enqueued"' not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by SIGKILL
            ticks[(str(entry["job"]), int(entry["tick"]))] += 1
    return ticks


async def expired_rows(settings: Settings) -> int:
    return int(
        await fetchval(
            settings,
            "SELECT count(*) FROM audit_events WHERE kind = 'expired' AND user_id LIKE 'idle-%'",
        )
    )


async def expired_users(settings: Settings) -> int:
    return int(
        await fetchval(
            settings,
            "SELECT count(*) FROM users WHERE id LIKE 'idle-%' AND status = 'disconnected'",
        )
    )


async def test_scheduler_killed_mid_tick(clean: Settings, spawn: Callable[..., Process]) -> None:
    # Given a worker and two scheduler replicas ticking every second
    spawn(*WORKER_ARGS, env=JOB_ENV)
    replicas = [spawn("scheduler", env=JOB_ENV), spawn("scheduler", env=JOB_ENV)]
    every = list(replicas)
    waves, per_wave = 6, 50
    # When idle users keep appearing while the replicas are SIGKILLed in turn just after a tick
    # boundary, and restarted
    for wave in range(waves):
        publish(clean, idle_wave(wave, per_wave))
        victim = wave % 2
        kill_at_next_tick(replicas[victim])
        replicas[victim] = spawn("scheduler", env=JOB_ENV)
        every.append(replicas[victim])
    restarted = time.monotonic()
    # Then every idle user is expired, exactly once, within a few periods
    total = waves * per_wave
    deadline = time.monotonic() + 30
    while (done := await expired_users(clean)) < total and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    recovery = time.monotonic() - restarted
    rows = await expired_rows(clean)
    ticks = enqueued_ticks(every)
    twice = {tick: n for tick, n in ticks.items() if n > 1}
    Figure(
        fault="scheduler SIGKILLed mid-tick x6",
        sent=total, applied=done, lost=total - done, duplicated=rows - done + len(twice),
        recovery_s=round(recovery, 1),
        note=f"2 replicas, {len(ticks)} ticks enqueued, {len(twice)} twice; sent/applied = idle"
        " users to expire / expired",
    ).save()  # fmt: skip
    assert done == total
    assert rows == total  # one `expired` row per ended session, none twice
    assert twice == {}
    # And the surviving replicas still tick after all the kills
    assert all(r.alive() for r in replicas)
    last = max(t for (_, t) in ticks) if ticks else 0
    time.sleep(2.5 * PERIOD_S)
    assert max(t for (_, t) in enqueued_ticks(every)) > last
