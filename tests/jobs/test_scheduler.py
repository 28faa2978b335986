"""The scheduler: each tick of each job is enqueued once, however many replicas run."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from actors.jobs import EXPIRE, FLUSH
from actors.scheduler import Job, Ticker
from actors.topology import JOBS_QUEUE
from sessiond.config import Settings
from storage import redis_conn
from storage.redis_conn import SyncClient
from storage.ticks import claim_tick, tick_key
from tests.conftest import Amqp, Process, wait_until

pytestmark = pytest.mark.integration


class FakeBroker:
    """Records what would be enqueued; the real broker is exercised by the process test below."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def enqueue(self, message: Any) -> Any:
        self.messages.append(message)
        return message


@pytest.fixture
def sync_redis(settings: Settings) -> Iterator[SyncClient]:
    client = redis_conn.connect_sync(settings)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_each_tick_is_enqueued_once_by_one_of_three_replicas(sync_redis: redis.Redis) -> None:
    # Given three replicas whose firings for the same tick arrive in any order, a little late
    broker = FakeBroker()
    clock = Clock(0.0)
    replicas = [Ticker(broker, sync_redis, owner=f"r{i}", clock=clock) for i in range(3)]  # type: ignore[arg-type]
    job = Job(FLUSH, 5.0)
    base = 1_800_000_000.0
    rng = random.Random(7)

    # When 20 ticks pass
    for n in range(20):
        for replica in rng.sample(replicas, k=3):
            clock.now = base + n * 5.0 + rng.uniform(0.0, 1.5)
            replica.fire(job)

    # Then each tick was enqueued exactly once, with its own scheduled time
    ticks = [m.kwargs["scheduled_at"] for m in broker.messages]
    assert len(ticks) == 20 and len(set(ticks)) == 20
    assert all(m.queue_name == JOBS_QUEUE and m.actor_name == FLUSH for m in broker.messages)


def test_a_replica_dying_mid_tick_does_not_block_the_next_tick(sync_redis: redis.Redis) -> None:
    # Given a replica that claimed tick k and died before enqueueing
    job = Job(EXPIRE, 60.0)
    now = 1_800_000_010.0
    dead = claim_tick(sync_redis, job.actor_name, job.period_s, now, "dead")
    assert dead is not None
    broker = FakeBroker()
    survivor = Ticker(broker, sync_redis, owner="alive", clock=Clock(now + 1))  # type: ignore[arg-type]

    # When the survivor fires in the same tick and then in the next one
    same = survivor.fire(job)
    survivor.clock = Clock(now + 60)
    following = survivor.fire(job)

    # Then the lost tick stays lost, and the next one fires; the tick keys expire on their own
    assert same is None and following == dead + 1
    assert len(broker.messages) == 1
    assert 0 < sync_redis.pttl(tick_key(EXPIRE, dead)) <= 180_000


def test_without_redis_no_replica_enqueues(sync_redis: redis.Redis) -> None:
    # Given a replica whose Redis is unreachable
    broker = FakeBroker()
    down = redis.Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))
    ticker = Ticker(broker, down, owner="r", clock=Clock(1_800_000_000.0))  # type: ignore[arg-type]

    # When a tick fires
    result = ticker.fire(Job(FLUSH, 5.0))

    # Then it is skipped rather than enqueued by every replica
    assert result is None and broker.messages == []


def _enqueued(proc: Process) -> list[tuple[str, int]]:
    ticks = []
    for line in proc.output().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == "tick enqueued":
            ticks.append((entry["job"], entry["tick"]))
    return ticks


@pytest.mark.slow
def test_two_scheduler_processes_enqueue_each_tick_once(
    spawn: Callable[..., Process], broker_client: Amqp, sync_redis: redis.Redis
) -> None:
    # Given two scheduler replicas with short periods
    env = {
        "SESSIOND_ACTIVITY_FLUSH_S": "0.5",
        "SESSIOND_EXPIRY_PERIOD_S": "1",
        "SESSIOND_LOG_LEVEL": "INFO",
    }
    replicas = [spawn("scheduler", env=env), spawn("scheduler", env=env)]

    # When both have run for a while
    wait_until(lambda: all("scheduler started" in p.output() for p in replicas), timeout=30)
    time.sleep(4.0)
    codes = [p.stop() for p in replicas]

    # Then they stopped cleanly on SIGTERM ...
    assert codes == [0, 0], [p.output()[-2000:] for p in replicas]
    assert all("scheduler stopped" in p.output() for p in replicas)
    # ... no tick was enqueued twice and none was skipped ...
    fired = [t for p in replicas for t in _enqueued(p)]
    assert Counter(fired).most_common(1)[0][1] == 1, fired
    for job, expected in ((FLUSH, 6), (EXPIRE, 3)):
        ticks = sorted(t for j, t in fired if j == job)
        assert len(ticks) >= expected, fired
        assert ticks == list(range(ticks[0], ticks[-1] + 1)), ticks
    # ... and the jobs queue holds exactly one message per tick
    assert broker_client.depth(JOBS_QUEUE) == len(fired)
