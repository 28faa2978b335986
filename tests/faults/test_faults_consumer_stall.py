"""The stall watchdog (``actors.consumer``): a worker whose consumer RabbitMQ stopped serving
reconnects, and the queue's ready messages are applied without any process being restarted.

The stall is made on the broker: the Erlang process of the consumer's channel is suspended, so
the connection stays healthy (heartbeats are the connection's, not the channel's) while nothing
is delivered on that channel any more, which is what a quorum queue that forgot its consumer
looks like from the worker (docs/cluster.md, "A consumer the queue forgot")."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import dramatiq
import pytest
from dramatiq.errors import ConnectionClosed

from actors.broker import Broker
from sessiond import amqp, stack
from sessiond.config import Settings
from sessiond.events import partition_of, partition_queue
from sessiond.stack import rabbitmq
from tests.conftest import Amqp, Process, async_wait_until
from tests.faults._support import next_delivery, pump

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 300  # as many messages, many times a consumer's prefetch: most of them stay ready
PARTITION = 3
HOLD_S = 120
HOLDER = "sessiond_test_stall_holder"


def users_of_partition(partitions: int, count: int) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < count:
        if partition_of(f"stall-{i}", partitions) == PARTITION:
            out.append(f"stall-{i}")
        i += 1
    return out


@contextmanager
def channels_suspended(cfg: stack.StackConfig, vhost: str, queue: str) -> Iterator[list[str]]:
    """Suspends the channel processes of ``queue``'s consumers until the block ends (at most
    ``HOLD_S``). A suspension lasts as long as the process that made it, so a process of its own
    on the node holds them, and undoes them when told or when its time is up. It registers its
    name before suspending anything: if a holder of an earlier run still lives, it crashes at
    once, suspending nothing, and the test's check of the channels' status fails."""
    hold = (
        f'Pids = [proplists:get_value(channel_pid, C) || C <- rabbit_amqqueue:consumers_all(<<"'
        f'{vhost}">>), element(4, proplists:get_value(queue_name, C)) =:= <<"{queue}">>], '
        f"spawn(fun() -> register({HOLDER}, self()), [erlang:suspend_process(P) || P <- Pids], "
        f"receive resume -> ok after {HOLD_S * 1000} -> ok end end), timer:sleep(200), "
        'lists:flatten(lists:join(" ", [pid_to_list(P) || P <- Pids])).'
    )
    pids = re.findall(r"<\d+\.\d+\.\d+>", rabbitmq.rabbitmqctl(cfg, "eval", hold).stdout)
    try:
        yield pids
    finally:
        rabbitmq.rabbitmqctl(cfg, "eval", f"catch {HOLDER} ! resume.")


def suspended(cfg: stack.StackConfig, pids: list[str]) -> int:
    """How many of ``pids`` are suspended."""
    listed = ",".join(f'"{p}"' for p in pids)
    ask = f"[catch erlang:process_info(list_to_pid(P), status) || P <- [{listed}]]."
    return rabbitmq.rabbitmqctl(cfg, "eval", ask).stdout.count("suspended")


def vhost_of(settings: Settings) -> str:
    return str(amqp.parameter_kwargs(settings)["virtual_host"])


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_a_stalled_consumer_reconnects_and_its_close_can_be_repeated(
    settings: Settings, stack_config: stack.StackConfig, queue: str, queue_type: str
) -> None:
    """Staged with the calls Dramatiq's consumer thread makes, on both queue types (a quorum
    queue of one member is still a quorum queue: its ready count comes from its Raft leader):
    an idle consumer of an empty queue never fires; with its channel suspended and messages
    ready, ``next`` raises ``ConnectionClosed``; ``close`` drops the connection at once and can
    be called again (a failed reconnect, a stop during the restart delay); a new consumer gets
    what was ready, then what the stuck channel held."""
    typed = settings.model_copy(update={"queue_type": queue_type, "consumer_stall_s": 0.3})
    broker = Broker(typed, parameters=[amqp.parameter_kwargs(settings)], middleware=[])
    fresh: Any = None
    try:
        broker.enqueue(dramatiq.Message(queue, "apply", ("warm",), {}, {}))
        listed = rabbitmq.rabbitmqctl(
            stack_config, "list_queues", "-q", "-p", vhost_of(settings), "name", "type"
        ).stdout
        assert f"{queue}\t{queue_type}" in listed
        consumer: Any = broker.consume(queue, prefetch=1, timeout=100)
        consumer.ack(next_delivery(consumer))
        pump(consumer)
        idle_until = time.monotonic() + 1.5  # five times the stall limit, nothing ready
        while time.monotonic() < idle_until:
            assert next(consumer) is None
        with channels_suspended(stack_config, vhost_of(settings), queue) as pids:
            assert pids and suspended(stack_config, pids) == len(pids)
            for name in ("A", "B", "C"):  # A goes to the suspended channel; B and C stay ready
                broker.enqueue(dramatiq.Message(queue, "apply", (name,), {}, {}))
            started = time.monotonic()
            with pytest.raises(ConnectionClosed, match="stalled"):
                while time.monotonic() - started < 10:
                    assert next(consumer) is None
            consumer.close()
            consumer.close()
            assert consumer.connection.is_closed
            assert time.monotonic() - started < 5  # about two checks past the limit
            fresh = broker.consume(queue, prefetch=1, timeout=100)
            got = []
            for _ in range(2):
                message = next_delivery(fresh)
                got.append(message.args[0])
                fresh.ack(message)
            assert sorted(got) == ["B", "C"]  # while A's channel is still stuck
        message = next_delivery(fresh)  # the old channel gone, A comes back
        assert message.args[0] == "A"
        fresh.ack(message)
        pump(fresh)
    finally:
        if fresh is not None:
            fresh.close()
        broker.close()


async def test_a_consumer_the_broker_stopped_serving_reconnects(
    broker_client: Amqp,
    pg: asyncpg.Connection,
    spawn: Callable[..., Process],
    settings: Settings,
    stack_config: stack.StackConfig,
) -> None:
    users = users_of_partition(settings.partitions, EVENTS + 1)
    worker = spawn(
        "worker", "--processes", "1", "--threads", "2", env={"SESSIOND_CONSUMER_STALL_S": "2"}
    )

    async def applied(n: int) -> bool:
        return int(await pg.fetchval("SELECT count(*) FROM processed_events")) >= n

    # Given a worker consuming the partition
    broker_client.publish({"event": "connected", "user_id": users[0], "event_id": "stall-warm"})
    await async_wait_until(lambda: applied(1), timeout=60)

    with channels_suspended(stack_config, vhost_of(settings), partition_queue(PARTITION)) as pids:
        assert pids, "no consumer of the partition found: the test proves nothing"
        assert suspended(stack_config, pids) == len(pids)
        # When RabbitMQ stops delivering on the consumer's channel and events keep coming
        # (one at a time: the ingress batches what it has, and many messages are wanted here)
        for u in users[1:]:
            broker_client.publish({"event": "connected", "user_id": u, "event_id": f"s-{u}"})
        # Then the worker notices, reconnects, and applies the events while that channel is
        # still stuck: all but those of the few messages RabbitMQ had sent to it
        await async_wait_until(lambda: applied(EVENTS // 2), timeout=60)
        assert suspended(stack_config, pids) == len(pids)  # still stuck: not undone
    # (only that consumer was taken for stalled, never the healthy ones beside it)
    stalls = [line for line in worker.output().splitlines() if "consumer stalled" in line]
    assert stalls and all(partition_queue(PARTITION) in line for line in stalls), stalls

    # And once the old channel is gone its messages come back: every event applied
    await async_wait_until(lambda: applied(EVENTS + 1), timeout=60)
    connected = await pg.fetchval("SELECT count(*) FROM users WHERE status = 'connected'")
    assert connected == EVENTS + 1
    assert broker_client.depth(settings.dead_letter_queue) == 0
