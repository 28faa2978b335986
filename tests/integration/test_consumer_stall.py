"""The stall watchdog (``actors.consumer``): a worker whose consumer RabbitMQ stopped serving
reconnects, and the queue's ready messages are applied without any process being restarted.

The stall is made on the broker: the Erlang process of the consumer's channel is suspended, so
the connection stays healthy (heartbeats are the connection's, not the channel's) while nothing
is delivered on that channel any more, which is what a quorum queue that forgot its consumer
looks like from the worker (docs/cluster.md, "A consumer the queue forgot")."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import unquote, urlsplit

import asyncpg
import pytest

from sessiond import stack
from sessiond.config import Settings
from sessiond.events import partition_of, partition_queue
from sessiond.stack import rabbitmq
from tests.conftest import Amqp, Process, async_wait_until

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
    on the node holds them, and undoes them when told or when its time is up."""
    hold = (
        f'Pids = [proplists:get_value(channel_pid, C) || C <- rabbit_amqqueue:consumers_all(<<"'
        f'{vhost}">>), element(4, proplists:get_value(queue_name, C)) =:= <<"{queue}">>], '
        "Holder = spawn(fun() -> [erlang:suspend_process(P) || P <- Pids], "
        f"receive resume -> ok after {HOLD_S * 1000} -> ok end end), "
        f"register({HOLDER}, Holder), "
        'lists:flatten(lists:join(" ", [pid_to_list(P) || P <- Pids])).'
    )
    pids = re.findall(r"<\d+\.\d+\.\d+>", rabbitmq.rabbitmqctl(cfg, "eval", hold).stdout)
    try:
        yield pids
    finally:
        rabbitmq.rabbitmqctl(cfg, "eval", f"catch {HOLDER} ! resume.")


def channel_status(cfg: stack.StackConfig, pids: list[str]) -> str:
    listed = ",".join(f'"{p}"' for p in pids)
    ask = f"[catch erlang:process_info(list_to_pid(P), status) || P <- [{listed}]]."
    return rabbitmq.rabbitmqctl(cfg, "eval", ask).stdout


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

    vhost = unquote(urlsplit(settings.amqp_url.split(",")[0]).path.lstrip("/"))
    with channels_suspended(stack_config, vhost, partition_queue(PARTITION)) as pids:
        assert pids, "no consumer of the partition found: the test proves nothing"
        assert "suspended" in channel_status(stack_config, pids)
        # When RabbitMQ stops delivering on the consumer's channel and events keep coming
        # (one at a time: the ingress batches what it has, and many messages are wanted here)
        for u in users[1:]:
            broker_client.publish({"event": "connected", "user_id": u, "event_id": f"s-{u}"})
        # Then the worker notices, reconnects, and applies the events while that channel is
        # still stuck: all but those of the few messages RabbitMQ had sent to it
        await async_wait_until(lambda: applied(EVENTS // 2), timeout=60)
        assert "consumer stalled" in worker.output()
        assert "suspended" in channel_status(stack_config, pids)  # still stuck: not undone

    # And once the old channel is gone its messages come back: every event applied
    await async_wait_until(lambda: applied(EVENTS + 1), timeout=60)
    connected = await pg.fetchval("SELECT count(*) FROM users WHERE status = 'connected'")
    assert connected == EVENTS + 1
    assert broker_client.depth(settings.dead_letter_queue) == 0
