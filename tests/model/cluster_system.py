"""The system under test on the local cluster (CONTRACT §10): ``python -m tests.model --cluster``.

The same processes and timings as ``tests.model.system``; only what they reach differs, and it
comes from ``cluster.namespace_env`` as for the benchmark's cluster stage: every RabbitMQ node in
the AMQP URL with quorum queues, the Redis Cluster, both PostgreSQL servers in one URL
(``target_session_attrs=read-write``), in the run's own vhost and database. Redis Cluster has
only db 0, so the run empties the cluster's masters at the start. The faults are
``tests.model.cluster_nemesis``'s.
"""

from __future__ import annotations

import contextlib
import urllib.error
from pathlib import Path

from redis.cluster import RedisCluster

from sessiond import stack
from sessiond.config import Settings
from sessiond.stack import cluster, rabbitmq_cluster
from sessiond.stack.cluster_config import ClusterConfig
from storage import redis_conn
from tests.model.client import Recorder
from tests.model.cluster_nemesis import ClusterNemesis
from tests.model.nemesis import Nemesis
from tests.model.system import JWT_SECRET, NAMESPACE, System


class ClusterSystem(System):
    def __init__(self, cluster_cfg: ClusterConfig, logs: Path) -> None:
        # ``cfg`` (the single-node stack's place in ``System``) is node 1's, for its ports only.
        super().__init__(rabbitmq_cluster.nodes(cluster_cfg)[0], logs)
        self.cluster = cluster_cfg

    def mgmt_ports(self) -> list[int]:
        return [node.mgmt_port for node in rabbitmq_cluster.nodes(self.cluster)]

    def prepare(self) -> Settings:
        """Cluster up, a fresh vhost and database, the Redis Cluster emptied, the migrations."""
        cluster.up(self.cluster)
        with contextlib.suppress(urllib.error.HTTPError):  # 404: no such vhost yet
            self.management("DELETE", f"vhosts/{NAMESPACE}")
        urls = cluster.namespace_env(self.cluster, NAMESPACE)
        fields = {k.removeprefix("SESSIOND_").lower(): v for k, v in urls.items()}
        settings = Settings.model_validate({**fields, "jwt_secret": JWT_SECRET})
        return self.install(urls, settings)

    def flush_redis(self, settings: Settings) -> None:
        client = redis_conn.connect_sync(settings)
        assert isinstance(client, RedisCluster)
        try:
            client.flushall(target_nodes=RedisCluster.PRIMARIES)
        finally:
            client.close()

    def nemesis(self, recorder: Recorder, *, seed: int, kinds: tuple[str, ...]) -> Nemesis:
        assert self.worker is not None
        return ClusterNemesis(self.cluster, self.worker, recorder, seed=seed, kinds=kinds)


def system_for(logs: Path, *, cluster: bool) -> System:
    """The local cluster's system, or the single-node stack's (``SESSIOND_STACK_*`` ports)."""
    if cluster:
        return ClusterSystem(ClusterConfig.from_env(), logs)
    return System(stack.StackConfig.from_env(), logs)
