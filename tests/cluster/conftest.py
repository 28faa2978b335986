"""The local cluster (CONTRACT §10) for the fault tests: up once per session, down at the end.

Its ports come from ``SESSIOND_STACK_CLUSTER_*_PORT`` / ``SESSIOND_STACK_REDIS_CLUSTER_PORT``
(see ``sessiond.stack.cluster_config``), so the suite's cluster never meets the single-node stack
nor another checkout's cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from sessiond.config import Settings
from sessiond.stack import cluster, rabbitmq, rabbitmq_cluster, redis_cluster
from sessiond.stack.cluster_config import ClusterConfig
from sessiond.stack.proc import StackError
from tests.conftest import Amqp, all_queues, rebuild_schema, truncate


@pytest.fixture(scope="session")
def cluster_config() -> ClusterConfig:
    return ClusterConfig.from_env()


@pytest.fixture(scope="session")
def redis_cluster_nodes(cluster_config: ClusterConfig) -> Iterator[list[tuple[str, int]]]:
    """A Redis Cluster of 3 masters + 3 replicas, formed and ``cluster_state:ok``; its startup
    nodes as ``(host, port)``. Stopped at the end of the session unless it was already up."""
    was_up = all(s["running"] for s in redis_cluster.status(cluster_config).values())
    redis_cluster.up(cluster_config)
    try:
        yield redis_cluster.startup_nodes(cluster_config)
    finally:
        if not was_up:
            redis_cluster.down(cluster_config)


# The RabbitMQ and PostgreSQL settings that reach the cluster. Redis stays the single-node
# stack's test db here, so that a RabbitMQ or PostgreSQL fault is all these tests measure (the
# Redis Cluster has its own tests).
CLUSTER_KEYS = (
    "SESSIOND_AMQP_URL",
    "SESSIOND_AMQP_CA_FILE",
    "SESSIOND_QUEUE_TYPE",
    "SESSIOND_DATABASE_URL",
)


@pytest.fixture(scope="session")
def cluster_env(local_cluster: ClusterConfig, test_env: dict[str, str]) -> dict[str, str]:
    """What a sessiond process needs (on top of ``test_env``) to run on the cluster."""
    env = cluster.env_dict(local_cluster, test=True)
    return {k: env[k] for k in CLUSTER_KEYS}


def settings_for(env: dict[str, str]) -> Settings:
    fields: dict[str, Any] = {k.removeprefix("SESSIOND_").lower(): v for k, v in env.items()}
    return Settings(**fields)


@pytest.fixture(scope="session")
def cluster_migrated(cluster_env: dict[str, str]) -> Settings:
    """The cluster's test database rebuilt from the migrations, once per session."""
    settings = settings_for(cluster_env)
    rebuild_schema(settings)
    return settings


@pytest.fixture
async def cluster_clean(
    cluster_migrated: Settings, local_cluster: ClusterConfig
) -> AsyncIterator[Settings]:
    """The cluster whole (a previous fault test's dead node restarted, a failed-over
    PostgreSQL pair rebuilt), empty tables, queues and Redis db; the settings reaching it."""
    cluster.up(local_cluster)
    settings = cluster_migrated
    await truncate(settings)
    client = Amqp(settings)
    try:
        client.purge(*all_queues(settings))
    finally:
        client.close()
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        await redis.flushdb()
    finally:
        await redis.aclose()
    yield settings


def broker_report(cfg: ClusterConfig, vhost: str) -> str:
    """What the live RabbitMQ nodes say of the vhost's queues and consumers (leader, members,
    ready and unacknowledged counts) and of their channels (unacknowledged per client port, which
    the failed test's connection list maps to a process), for a fault test's failure message:
    the cluster is reset by the next test, so this is the one moment to read it."""
    lines: list[str] = []
    cluster_wide: tuple[tuple[str, ...], ...] = (
        ("list_queues", "-p", vhost, "name", "type", "leader", "members", "messages_ready",
         "messages_unacknowledged", "consumers"),  # (RabbitMQ 3.10: no SAC tag column)
        ("list_consumers", "-p", vhost, "queue_name", "channel_pid", "consumer_tag", "active"),
    )  # fmt: skip
    per_node: tuple[tuple[str, ...], ...] = (
        ("list_channels", "name", "consumer_count", "messages_unacknowledged", "prefetch_count"),
    )
    live = [n for n in rabbitmq_cluster.nodes(cfg) if rabbitmq.running(n)]
    commands = [(node, what) for node in live[:1] for what in cluster_wide]
    commands += [(node, what) for node in live for what in per_node]
    for node, what in commands:
        try:
            out = rabbitmq.rabbitmqctl(node, *what, timeout=30)
            lines.append(f"{node.rabbit_node} {what[0]}:\n{out.stdout}")
        except StackError as exc:
            lines.append(f"{node.rabbit_node} {what[0]}: {exc}")
    return "\n".join(lines)
