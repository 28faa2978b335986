"""``sessiond stack up|status|env --cluster`` as a user runs them (CONTRACT §10): real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sessiond.stack.cluster_config import ClusterConfig

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

CLI = [str(Path(sys.executable).parent / "sessiond")]


def sessiond(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=300, env=os.environ.copy()
    )


def test_status_names_every_server_with_its_live_role(local_cluster: ClusterConfig) -> None:
    # Given the cluster is up (a second up is a no-op that succeeds)
    assert sessiond("stack", "up", "--cluster", "--no-install").returncode == 0
    # When its status is asked for
    done = sessiond("stack", "status", "--cluster")
    assert done.returncode == 0, done.stderr
    servers = json.loads(done.stdout)["servers"]
    # Then every server is there by name, with a live pid, a data directory and its role
    redis = [f"redis-{p}" for p in local_cluster.redis_ports()]
    assert sorted(servers) == sorted(
        ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3", *redis, "postgres-primary", "postgres-standby"]
    )
    for name, server in servers.items():
        assert isinstance(server["pid"], int) and server["pid"] > 0, name
        assert Path(server["data_dir"]).is_dir(), name
    assert sorted(servers[r]["role"] for r in redis) == ["master"] * 3 + ["replica"] * 3
    pg_roles = {servers[p]["role"] for p in ("postgres-primary", "postgres-standby")}
    assert pg_roles == {"primary", "standby"}
    rabbits = {tuple(servers[f"rabbitmq-{n}"]["running_nodes"]) for n in (1, 2, 3)}
    assert len(rabbits) == 1 and len(next(iter(rabbits))) == 3  # one cluster of three


def test_env_reaches_every_node(local_cluster: ClusterConfig) -> None:
    done = sessiond("stack", "env", "--cluster")
    assert done.returncode == 0, done.stderr
    env = dict(line.removeprefix("export ").split("=", 1) for line in done.stdout.splitlines())
    env = {k: v.strip("'") for k, v in env.items()}
    assert env["SESSIOND_QUEUE_TYPE"] == "quorum"
    assert env["SESSIOND_REDIS_CLUSTER"] == "true"
    assert len(env["SESSIOND_AMQP_URL"].split(",")) == 3
    assert all(u.startswith("amqps://") for u in env["SESSIOND_AMQP_URL"].split(","))
    assert len(env["SESSIOND_REDIS_URL"].split(",")) == 6
    db = env["SESSIOND_DATABASE_URL"]
    assert db.endswith("?target_session_attrs=read-write") and db.count(",") == 1
    assert Path(env["SESSIOND_AMQP_CA_FILE"]).is_file()
