"""``rabbitmq_cluster.wait_whole``: the premise of every RabbitMQ fault test (and of the model's
healing) is a cluster whose quorum queues have all their members online, so that any one node
may go. Checked against RabbitMQ's own ``check_if_node_is_quorum_critical``."""

from __future__ import annotations

import uuid

import pika
import pytest

from sessiond import amqp
from sessiond.config import Settings
from sessiond.stack import rabbitmq, rabbitmq_cluster
from sessiond.stack.cluster_config import ClusterConfig

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.slow]


def test_a_node_down_makes_the_others_critical_until_it_is_back(
    cluster_clean: Settings, local_cluster: ClusterConfig
) -> None:
    # Given a quorum queue on the whole cluster
    queue = f"quorum.probe.{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(amqp.connection_parameters(cluster_clean))
    try:
        conn.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        first, second, third = rabbitmq_cluster.nodes(local_cluster)
        rabbitmq_cluster.wait_whole(local_cluster, timeout=30)
        assert rabbitmq_cluster.quorum_critical(first) == []
        # When node 3 stops
        rabbitmq.stop(third)
        # Then nodes 1 and 2 each hold the queue's majority, and say so by its name
        for node in (first, second):
            critical = rabbitmq_cluster.quorum_critical(node)
            assert any(f"'{queue}'" in line for line in critical), critical
        # And once node 3 is back (``up`` returns only then), any node may go again
        rabbitmq_cluster.up(local_cluster)
        assert rabbitmq_cluster.quorum_critical(first) == []
        assert rabbitmq_cluster.quorum_critical(second) == []
    finally:
        if not conn.is_open:
            conn = pika.BlockingConnection(amqp.connection_parameters(cluster_clean))
        conn.channel().queue_delete(queue)
        conn.close()
