"""The scheduler process (``sessiond scheduler``): enqueues the periodic jobs on the jobs queue.

Every replica runs the same APScheduler triggers, aligned on multiples of each job's period. At
each firing a replica claims the tick ``floor(now / period)`` with ``SET sched:<job>:<tick> NX PX``
in Redis; only the replica that wins enqueues the job's message, so each tick fires once in the
whole system however many replicas run. The key names a tick, not a leader: a replica that dies
mid-tick blocks nothing but that tick, and the next tick is claimed afresh.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dramatiq
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from actors import messages
from actors.jobs import EXPIRE, FLUSH, period_s
from sessiond.config import Settings, get_settings
from sessiond.errors import DependencyUnavailable
from storage.redis_conn import SyncClient, connect_sync
from storage.ticks import claim_tick

log = logging.getLogger("sessiond.scheduler")

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Job:
    actor_name: str
    period_s: float


def jobs(settings: Settings) -> list[Job]:
    return [Job(name, period_s(settings, name)) for name in (FLUSH, EXPIRE)]


def job_message(job: Job, tick: int) -> dramatiq.Message[Any]:
    return messages.job_tick(job.actor_name, tick * job.period_s)


class Ticker:
    """Claims ticks and enqueues jobs; the clock is injectable for tests."""

    def __init__(
        self,
        broker: dramatiq.Broker,
        client: SyncClient,
        *,
        owner: str | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.broker = broker
        self.client = client
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.clock = clock

    def fire(self, job: Job) -> int | None:
        """Enqueues ``job`` when this replica wins the current tick; returns that tick."""
        try:
            tick = claim_tick(self.client, job.actor_name, job.period_s, self.clock(), self.owner)
        except DependencyUnavailable as exc:
            # Without the lock every replica would enqueue: skip the tick, the next one is close.
            log.error(
                "tick not claimed: redis unavailable",
                extra={"job": job.actor_name, "error": repr(exc)},
            )
            return None
        if tick is None:
            log.debug("tick taken by another replica", extra={"job": job.actor_name})
            return None
        try:
            self.broker.enqueue(job_message(job, tick))
        except Exception as exc:
            log.error(
                "tick lost: enqueue failed",
                extra={"job": job.actor_name, "tick": tick, "error": repr(exc)},
            )
            return None
        log.info(
            "tick enqueued", extra={"job": job.actor_name, "tick": tick, "replica": self.owner}
        )
        return tick


def build_scheduler(ticker: Ticker, job_list: list[Job]) -> BackgroundScheduler:
    """Triggers start on a multiple of each period, so replicas fire together and agree on ticks."""
    scheduler = BackgroundScheduler(
        timezone=UTC,
        executors={"default": ThreadPoolExecutor(1)},
        job_defaults={"coalesce": True, "max_instances": 1},
    )
    now = ticker.clock()
    for job in job_list:
        start = datetime.fromtimestamp(math.ceil(now / job.period_s) * job.period_s, tz=UTC)
        scheduler.add_job(
            ticker.fire,
            IntervalTrigger(seconds=job.period_s, start_date=start, timezone=UTC),
            args=[job],
            id=job.actor_name,
            misfire_grace_time=max(1, int(job.period_s)),
        )
    return scheduler


def main() -> int:
    settings = get_settings()
    # Importing the app sets up logging, builds the broker and declares the actors; nothing
    # consumes here (the ingress starts only inside workers).
    from actors.app import broker

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("scheduler stopping", extra={"signal": signum})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    client = connect_sync(settings)
    ticker = Ticker(broker, client)
    job_list = jobs(settings)
    scheduler = build_scheduler(ticker, job_list)
    scheduler.start()
    log.info(
        "scheduler started",
        extra={"replica": ticker.owner, "periods": {j.actor_name: j.period_s for j in job_list}},
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        scheduler.shutdown(wait=True)
        broker.close()
        client.close()
    log.info("scheduler stopped", extra={"replica": ticker.owner})
    return 0


if __name__ == "__main__":
    sys.exit(main())
