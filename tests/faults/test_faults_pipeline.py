"""Faults on the event pipeline, with real processes and servers: a worker SIGKILLed, RabbitMQ
restarted, PostgreSQL stopped, Redis restarted, each in the middle of a stream of events. After
recovery every event is applied once in effect and the state is what the events say."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from sessiond import stack
from sessiond.config import Settings
from tests.conftest import Process
from tests.faults._support import (
    WORKER_ARGS,
    WORKER_ENV,
    Stream,
    applied,
    measure,
    pg_down_s,
    publish,
    wait_applied,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_worker_sigkilled_mid_stream(clean: Settings, spawn: Callable[..., Process]) -> None:
    # Given two worker processes consuming a stream long enough to be cut (several seconds)
    stream = Stream("kill", users=1500)
    worker = spawn(*WORKER_ARGS, env=WORKER_ENV)
    publish(clean, stream.events)
    await wait_applied(clean, stream, at_least=150, timeout=40)
    # When the whole worker (main process and children) is SIGKILLed mid-stream: no shutdown,
    # unacknowledged messages and half-done transactions are simply abandoned
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(10)
    killed_at = await applied(clean, stream)
    assert killed_at < len(stream.events), "the stream ended before the kill; make it longer"
    # And a new worker starts
    spawn(*WORKER_ARGS, env=WORKER_ENV)
    recovered = time.monotonic()
    # Then every event is applied exactly once in effect
    figure = await measure(
        clean, stream, fault="worker SIGKILLed", recovered_at=recovered,
        note=f"killed after {killed_at} applied; recovery from the new worker's start",
    )  # fmt: skip
    assert figure.applied == len(stream.events)


async def test_rabbitmq_restarted_mid_stream(
    clean: Settings, spawn: Callable[..., Process], servers_back: stack.StackConfig
) -> None:
    # Given a worker consuming the first three quarters of a stream
    stream = Stream("rmq", users=3000)
    first, second = stream.split(0.75)
    worker = spawn(*WORKER_ARGS, env=WORKER_ENV)
    publish(clean, first)
    await wait_applied(clean, stream, at_least=100, timeout=40)
    # When RabbitMQ stops (messages in flight, unacknowledged) and starts again; stopping takes
    # a few seconds, during which the worker goes on, so "mid-stream" is checked as it begins
    stopping_at = await applied(clean, stream)
    assert stopping_at < len(first), "the first part ended before the stop; make it longer"
    stack.stop(servers_back, "rabbitmq")
    stopped_with = await applied(clean, stream)
    stack.start(servers_back, "rabbitmq")
    recovered = time.monotonic()
    # And the auth service publishes the rest once the broker is back
    publish(clean, second)
    # Then the worker reconnected by itself and everything is applied once in effect
    figure = await measure(
        clean, stream, fault="RabbitMQ restarted", recovered_at=recovered,
        note=f"{stopping_at} applied when the stop began, {stopped_with} when it ended;"
        " recovery from the broker's restart",
    )  # fmt: skip
    assert worker.alive(), worker.output()[-2000:]
    assert figure.applied == len(stream.events)


async def test_postgres_stopped_mid_stream(
    clean: Settings, spawn: Callable[..., Process], servers_back: stack.StackConfig
) -> None:
    down_s = pg_down_s()
    stream = Stream("pgdown", users=250)
    first, second = stream.split()
    worker = spawn(*WORKER_ARGS, env=WORKER_ENV)
    publish(clean, first)
    await wait_applied(clean, stream, at_least=100, timeout=40)
    stopped_with = await applied(clean, stream)
    # When PostgreSQL stops while events keep coming
    stack.stop(servers_back, "postgres")
    try:
        started = time.monotonic()
        publish(clean, second)
        time.sleep(max(0.0, down_s - (time.monotonic() - started)))
    finally:
        stack.start(servers_back, "postgres")
    recovered = time.monotonic()
    # Then the events waited (retries), none was dead-lettered, all are applied once in effect
    figure = await measure(
        clean, stream, fault=f"PostgreSQL stopped {down_s:.0f} s", recovered_at=recovered,
        note=f"about {stopped_with} applied when it stopped; recovery from its restart",
    )  # fmt: skip
    assert worker.alive(), worker.output()[-2000:]
    assert figure.applied == len(stream.events)


async def test_redis_restarted_mid_stream(
    clean: Settings, spawn: Callable[..., Process], servers_back: stack.StackConfig
) -> None:
    stream = Stream("redis", users=300)
    first, second = stream.split(0.5)
    worker = spawn(*WORKER_ARGS, env=WORKER_ENV)
    publish(clean, first)
    await wait_applied(clean, stream, at_least=150, timeout=40)
    # When Redis stops for 3 s while events keep coming, and comes back empty (no persistence:
    # a restart is a flush too)
    stack.stop(servers_back, "redis")
    stopped_with = await applied(clean, stream)
    publish(clean, second)
    time.sleep(3)
    stack.start(servers_back, "redis")
    recovered = time.monotonic()
    # Then PostgreSQL has every event once in effect; Redis never says a disconnected user is
    # connected, and what it caches is right (keys lost with the restart are refilled by the API
    # on the next request: cache-aside)
    figure = await measure(
        clean, stream, fault="Redis restarted (data lost)", recovered_at=recovered,
        strict_cache=False,
        note=f"{stopped_with} applied when it stopped; lost cache keys are refilled on demand",
    )  # fmt: skip
    assert worker.alive(), worker.output()[-2000:]
    assert figure.applied == len(stream.events)
