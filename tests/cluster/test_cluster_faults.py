"""Faults on the local cluster (issue 15): a RabbitMQ node SIGKILLed mid-stream and left dead,
the PostgreSQL primary SIGKILLed and its synchronous standby promoted. Real servers, real
``sessiond worker`` / ``sessiond api`` processes; quorum queues, multi-node AMQP URLs and a
multi-host database URL, as ``stack env --cluster`` prints them."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import pytest
import redis.asyncio as aioredis

from loadtests.harness import free_port
from sessiond import amqp
from sessiond.config import Settings
from sessiond.stack import postgres_cluster, rabbitmq_cluster
from sessiond.stack.cluster_config import ClusterConfig
from tests.api.conftest import http, mint
from tests.cluster.conftest import broker_report
from tests.conftest import Process, wait_until
from tests.faults._support import (
    WORKER_ARGS,
    WORKER_ENV,
    Stream,
    applied,
    fetchval,
    measure,
    publish,
    wait_applied,
)

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.slow]


class Publisher(threading.Thread):
    """The auth service publishing through a node loss: AMQP transactions of ``batch`` events,
    paced to last a while; a batch whose commit did not come back is published again on a new
    connection (to the next live node). ``confirmed`` counts events of committed batches: those
    the broker promised to keep. A batch re-sent after a lost commit may arrive twice, which
    de-duplication absorbs (at-least-once, CONTRACT §1)."""

    def __init__(
        self, settings: Settings, events: list[dict[str, Any]], batch: int, pause: float
    ) -> None:
        super().__init__(daemon=True)
        self.settings, self.events, self.batch, self.pause = settings, events, batch, pause
        self.confirmed = 0
        self.reconnects = 0
        # It publishes a first third, then waits for this (the workers are busy by then) before
        # pacing the rest: the fault lands mid-stream however slow the workers start.
        self.resume = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _channel(self) -> tuple[pika.BlockingConnection, Any]:
        conn = pika.BlockingConnection(amqp.connection_parameters(self.settings))
        ch = conn.channel()
        amqp.declare_topology(ch, self.settings)
        ch.tx_select()
        return conn, ch

    def _run(self) -> None:
        conn, ch = self._channel()
        deadline = time.monotonic() + 120
        i = 0
        while i < len(self.events):
            chunk = self.events[i : i + self.batch]
            try:
                for body in chunk:
                    ch.basic_publish(
                        self.settings.events_exchange,
                        "auth.cluster",
                        json.dumps(body).encode(),
                        pika.BasicProperties(delivery_mode=2, content_type="application/json"),
                    )
                ch.tx_commit()
            except (pika.exceptions.AMQPError, OSError):
                if time.monotonic() > deadline:
                    raise
                self.reconnects += 1
                time.sleep(0.5)
                with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                    conn, ch = self._channel()  # else the next pass tries again
                continue
            i += len(chunk)
            self.confirmed = i
            if i >= len(self.events) // 3 and not self.resume.is_set():
                self.resume.wait(90)
            time.sleep(self.pause)
        conn.close()


async def test_rabbitmq_node_sigkilled_mid_stream_loses_no_confirmed_event(
    cluster_clean: Settings,
    cluster_env: dict[str, str],
    local_cluster: ClusterConfig,
    spawn: Callable[..., Process],
) -> None:
    settings = cluster_clean
    # Given workers (ingress included) consuming quorum queues, and a publisher streaming events;
    # every client is on node 1 (the first URL), which also leads the queues it declared
    stream = Stream("qq", users=1000)
    worker = spawn(*WORKER_ARGS, env={**WORKER_ENV, **cluster_env})
    publisher = Publisher(settings, stream.events, batch=25, pause=0.1)
    publisher.start()
    await wait_applied(settings, stream, at_least=200, timeout=90)
    # (every queue the workers declared replicated on all three nodes first: the premise)
    rabbitmq_cluster.wait_whole(local_cluster)
    publisher.resume.set()
    time.sleep(1)
    # When node 1 is SIGKILLed mid-stream (no shutdown, its connections cut) and left dead
    rabbitmq_cluster.kill(local_cluster, 1)
    killed_at = await applied(settings, stream)
    published_at = publisher.confirmed
    assert published_at < len(stream.events), "the stream ended before the kill; make it longer"
    publisher.join(150)
    assert publisher.error is None, repr(publisher.error)
    assert publisher.confirmed == len(stream.events)
    recovered = time.monotonic()
    # Then every confirmed event reaches PostgreSQL once in effect, the state is what the
    # events say, and the worker went on by itself on the two remaining nodes
    try:
        figure = await measure(
            settings, stream, fault="RabbitMQ node SIGKILLed (quorum, 3 nodes)",
            recovered_at=recovered, timeout=120,
            note=f"{published_at} confirmed and {killed_at} applied at the kill;"
            f" publisher reconnected {publisher.reconnects}x; recovery from the last confirm",
        )  # fmt: skip
    except AssertionError:
        vhost = amqp.parameter_kwargs(settings)["virtual_host"]
        sys.stderr.write(broker_report(local_cluster, vhost) + "\n")
        raise
    assert figure.applied == len(stream.events)
    assert worker.alive(), worker.output()[-3000:]
    servers = rabbitmq_cluster.status(local_cluster)
    assert servers["rabbitmq-1"]["running"] is False
    assert servers["rabbitmq-2"]["running"] and servers["rabbitmq-3"]["running"]


async def test_postgres_primary_sigkilled_standby_promoted(
    cluster_clean: Settings,
    cluster_env: dict[str, str],
    local_cluster: ClusterConfig,
    spawn: Callable[..., Process],
) -> None:
    settings = cluster_clean
    # Given a worker and an API on the multi-host database URL, and half a stream applied
    stream = Stream("pgfo", users=400)
    first, second = stream.split()
    env = {**WORKER_ENV, **cluster_env}
    worker = spawn(*WORKER_ARGS, env=env)
    port = free_port()
    api = spawn("api", "--port", str(port), "--workers", "1", env=env)
    url = f"http://127.0.0.1:{port}"
    publish(settings, first)
    await wait_applied(settings, stream, at_least=150, timeout=60)
    # When the primary is SIGKILLed mid-stream (every commit acknowledged so far is on the
    # synchronous standby too) and the standby is promoted, as a failover manager would
    acknowledged = await applied(settings, stream)
    postgres_cluster.kill_primary(local_cluster)
    assert acknowledged < len(stream.events)
    time.sleep(1)
    promoted = postgres_cluster.promote(local_cluster)
    recovered = time.monotonic()
    # And the auth service goes on publishing
    publish(settings, second)
    # Then the pipeline goes on: every event is applied once in effect, nothing acknowledged
    # before the kill is missing, the state is what the events say
    figure = await measure(
        settings, stream, fault="PostgreSQL primary SIGKILLed, standby promoted",
        recovered_at=recovered, timeout=120,
        note=f"{acknowledged} applied (acknowledged) just before the kill;"
        " recovery from the promotion",
    )  # fmt: skip
    assert figure.applied == len(stream.events)
    assert worker.alive(), worker.output()[-3000:]
    assert postgres_cluster.role(promoted) == "primary"
    port_now = await fetchval(settings, "SELECT inet_server_port()")
    assert port_now == promoted.pg_port
    # And the API answers from the new primary: a login published after the failover is
    # granted, also once the cache is emptied (the decision then comes from PostgreSQL), and a
    # user the stream logged out is refused
    wait_until(lambda: api.alive() and ready(url), timeout=60)
    publish(settings, [{"event": "connected", "user_id": "pgfo-new", "session_id": "s1"}])
    token = mint("pgfo-new", sid="s1")
    wait_until(lambda: http(url + "/auth/check", token=token).status == 200, timeout=30)
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        await redis.flushdb()
    finally:
        await redis.aclose()
    reply = http(url + "/auth/check", token=token)
    assert reply.status == 200, reply.body
    gone = next(u for u, s in stream.expected.items() if s == "disconnected")
    reply = http(url + "/auth/check", token=mint(gone))
    assert reply.status == 403, reply.body


def ready(url: str) -> bool:
    try:
        return http(url + "/health/ready").status == 200
    except OSError:
        return False
