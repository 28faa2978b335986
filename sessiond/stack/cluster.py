"""The local cluster's public face (CONTRACT §10): ``sessiond stack up|down|status|env --cluster``.

Three RabbitMQ nodes, a Redis Cluster of 3 masters + 3 replicas and a PostgreSQL primary with a
synchronous standby, all on 127.0.0.1 under ``<stack dir>/cluster`` and on ports of their own
(``sessiond.stack.cluster_config``), so that it runs beside the single-node stack. One module per
kind of server; this one only sequences them and says how to reach them.
"""

from __future__ import annotations

from typing import Any

from sessiond.stack import postgres_cluster, rabbitmq, rabbitmq_cluster, redis_cluster
from sessiond.stack.cluster_config import ClusterConfig
from sessiond.stack.config import DATABASES, PASSWORD, USER, VHOSTS

__all__ = ["ClusterConfig", "down", "env_dict", "env_lines", "status", "up"]


def up(cfg: ClusterConfig) -> None:
    """Idempotent, like ``stack up``: starts what is not running."""
    cfg.root.mkdir(parents=True, exist_ok=True)
    postgres_cluster.up(cfg)
    redis_cluster.up(cfg)
    rabbitmq_cluster.up(cfg)


def down(cfg: ClusterConfig) -> None:
    rabbitmq_cluster.down(cfg)
    redis_cluster.down(cfg)
    postgres_cluster.down(cfg)


def status(cfg: ClusterConfig) -> dict[str, dict[str, Any]]:
    """Per server: ``pid``, ``role`` (read from the server), ``data_dir``, ports, ``running``."""
    return {
        **rabbitmq_cluster.status(cfg),
        **redis_cluster.status(cfg),
        **postgres_cluster.status(cfg),
    }


def env_dict(cfg: ClusterConfig, *, test: bool = False) -> dict[str, str]:
    """The ``SESSIOND_*`` settings that reach the cluster: every node in each URL, so that a
    client starts (and reconnects) while any one of them is down. Redis Cluster has only db 0,
    so the test flavour differs from the real one in its vhost and database only."""
    vhost = VHOSTS[1] if test else VHOSTS[0]
    db = DATABASES[1] if test else DATABASES[0]
    amqp = ",".join(
        f"amqps://{USER}:{PASSWORD}@127.0.0.1:{node.amqps_port}/{vhost}"
        for node in rabbitmq_cluster.nodes(cfg)
    )
    return {
        "SESSIOND_AMQP_URL": amqp,
        "SESSIOND_AMQP_CA_FILE": str(cfg.ca_file),
        "SESSIOND_QUEUE_TYPE": "quorum",
        "SESSIOND_REDIS_CLUSTER": "true",
        "SESSIOND_REDIS_URL": redis_cluster.urls(cfg),
        "SESSIOND_DATABASE_URL": (
            f"postgres://{USER}:{PASSWORD}@{postgres_cluster.dsn_hosts(cfg)}/{db}"
            "?target_session_attrs=read-write"
        ),
    }


def namespace_env(cfg: ClusterConfig, name: str) -> dict[str, str]:
    """A private corner of the running cluster, like ``stack.namespace_env``: vhost and database
    ``name`` (created when missing, on whichever PostgreSQL server is the primary now)."""
    live = next(n for n in rabbitmq_cluster.nodes(cfg) if rabbitmq.running(n))
    rabbitmq.rabbitmqctl(live, "add_vhost", name, check=False)
    rabbitmq.rabbitmqctl(live, "set_permissions", "-p", name, USER, ".*", ".*", ".*")
    postgres_cluster.ensure_database(cfg, name)
    env = env_dict(cfg)
    env["SESSIOND_AMQP_URL"] = ",".join(
        u.rsplit("/", 1)[0] + f"/{name}" for u in env["SESSIOND_AMQP_URL"].split(",")
    )
    base, query = env["SESSIOND_DATABASE_URL"].split("?", 1)
    env["SESSIOND_DATABASE_URL"] = base.rsplit("/", 1)[0] + f"/{name}?{query}"
    return env


def env_lines(cfg: ClusterConfig, *, test: bool = False) -> list[str]:
    return [f"export {k}='{v}'" for k, v in env_dict(cfg, test=test).items()]
