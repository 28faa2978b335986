"""The local cluster (CONTRACT §10) for the fault tests: up once per session, down at the end.

Its ports come from ``SESSIOND_STACK_CLUSTER_*_PORT`` / ``SESSIOND_STACK_REDIS_CLUSTER_PORT``
(see ``sessiond.stack.cluster_config``), so the suite's cluster never meets the single-node stack
nor another checkout's cluster.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sessiond.stack import redis_cluster
from sessiond.stack.cluster_config import ClusterConfig


@pytest.fixture(scope="session")
def cluster_config() -> ClusterConfig:
    return ClusterConfig.from_env()


@pytest.fixture(scope="session")
def redis_cluster_nodes(cluster_config: ClusterConfig) -> Iterator[list[tuple[str, int]]]:
    """A Redis Cluster of 3 masters + 3 replicas, formed and ``cluster_state:ok``; its startup
    nodes as ``(host, port)``. Stopped at the end of the session."""
    redis_cluster.up(cluster_config)
    try:
        yield redis_cluster.startup_nodes(cluster_config)
    finally:
        redis_cluster.down(cluster_config)
