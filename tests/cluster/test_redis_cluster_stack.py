"""The Redis Cluster of the local cluster: six live nodes, roles read from the servers."""

from __future__ import annotations

import pytest

from sessiond.stack import redis_cluster
from sessiond.stack.cluster_config import ClusterConfig

pytestmark = [pytest.mark.integration, pytest.mark.cluster]


def test_three_masters_and_three_replicas_cover_every_slot(
    cluster_config: ClusterConfig, redis_cluster_nodes: list[tuple[str, int]]
) -> None:
    servers = redis_cluster.status(cluster_config)
    assert sorted(servers) == [f"redis-{p}" for _, p in redis_cluster_nodes]
    roles = sorted(s["role"] for s in servers.values())
    assert roles == ["master"] * 3 + ["replica"] * 3
    assert all(isinstance(s["pid"], int) for s in servers.values())
    info = redis_cluster.cli(redis_cluster_nodes[0][1], "cluster", "info")
    assert "cluster_state:ok" in info and "cluster_slots_assigned:16384" in info
    # and a second up changes nothing
    redis_cluster.up(cluster_config)
    assert redis_cluster.status(cluster_config) == servers
