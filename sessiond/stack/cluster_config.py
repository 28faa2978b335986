"""Where the local cluster lives and which ports its nine servers use (CONTRACT §10).

The cluster has its own directory (``<stack dir>/cluster``) and its own ports, so that the
single-node stack and the cluster run side by side. Each kind of server takes a base port and
numbers its nodes from it; every base is movable by ``SESSIOND_STACK_CLUSTER_<NAME>_PORT``
(``SESSIOND_STACK_REDIS_CLUSTER_PORT`` for Redis). The defaults avoid the single-node stack's
ports (5432, 5671, 5672, 6379, 15672, 25672, epmd's 4369), and keep every derived port (Redis'
cluster bus at port + 10000, rabbitmqctl's own distribution ports at dist + 10000 … + 10010)
below 65536.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sessiond.stack.config import StackConfig, env_port

RABBIT_NODES = 3
REDIS_NODES = 6  # 3 masters + 1 replica each


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Paths and base ports of the local cluster."""

    root: Path
    amqp_port: int = 5681
    amqps_port: int = 5691
    mgmt_port: int = 15681
    dist_port: int = 25681
    redis_port: int = 7000
    pg_port: int = 5442

    @classmethod
    def from_env(cls) -> ClusterConfig:
        stack_root = Path(os.environ.get("SESSIOND_STACK_DIR", ".stack")).resolve()
        return cls(
            root=stack_root / "cluster",
            amqp_port=env_port("CLUSTER_AMQP", 5681),
            amqps_port=env_port("CLUSTER_AMQPS", 5691),
            mgmt_port=env_port("CLUSTER_MGMT", 15681),
            dist_port=env_port("CLUSTER_DIST", 25681),
            redis_port=env_port("REDIS_CLUSTER", 7000),
            pg_port=env_port("CLUSTER_PG", 5442),
        )

    @property
    def tls_dir(self) -> Path:
        """One CA and one server certificate for all three RabbitMQ nodes: a client trusts one
        CA whichever node it reaches."""
        return self.root / "tls"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.pem"

    def redis_ports(self) -> list[int]:
        return [self.redis_port + i for i in range(REDIS_NODES)]

    def rabbit(self, n: int) -> StackConfig:
        """Node ``n`` (1-based) as a single-node stack of its own, so that
        ``sessiond.stack.rabbitmq`` starts it unchanged; its node name follows its AMQP port."""
        i = n - 1
        return StackConfig(
            root=self.root / f"rabbitmq-{n}",
            amqp_port=self.amqp_port + i,
            amqps_port=self.amqps_port + i,
            mgmt_port=self.mgmt_port + i,
            dist_port=self.dist_port + i,
            tls_root=self.tls_dir,
        )

    def postgres(self, name: str) -> StackConfig:
        """``primary`` or ``standby`` as a single-node stack of its own (data, socket, log and the
        /var/lib/sessiond fallback of ``sessiond.stack.postgres``, unchanged)."""
        offset = {"primary": 0, "standby": 1}[name]
        return StackConfig(root=self.root / f"postgres-{name}", pg_port=self.pg_port + offset)
