"""``sessiond stack up|status|env --cluster`` as a user runs them (CONTRACT §10): real servers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.harness import free_port
from sessiond.stack import postgres, postgres_cluster
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


def test_postgres_pair_fails_over_and_is_rebuilt_out_of_reach_of_postgres(tmp_path: Path) -> None:
    # Given a stack directory under a 0700 parent, as /root/sessiond on Debian (we run as root)
    assert os.geteuid() == 0, "the suite runs as root, as scripts/test does on Debian"
    parent = tmp_path / "home"
    parent.mkdir(mode=0o700)
    parent.chmod(0o700)
    cfg = ClusterConfig(root=parent / "sessiond" / ".stack" / "cluster", pg_port=free_port(span=2))
    primary, standby = cfg.postgres("primary"), cfg.postgres("standby")
    try:
        # When the pair comes up: the data lives where postgres can reach it, the standby streams
        postgres_cluster.up(cfg)
        assert postgres.home(primary).parent == postgres.VAR_BASE
        roles = {n: s["role"] for n, s in postgres_cluster.status(cfg).items()}
        assert roles == {"postgres-primary": "primary", "postgres-standby": "standby"}
        sync = postgres.psql(primary, "SELECT sync_state FROM pg_stat_replication")
        assert sync == "sync"
        postgres.psql(primary, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)")
        # And the primary dies, the standby is promoted: it has the commit, and takes writes
        pid = postgres_cluster.pid(primary)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        postgres_cluster.promote(cfg)
        assert postgres.psql(standby, "SELECT count(*) FROM kept") == "1"
        postgres.psql(standby, "INSERT INTO kept VALUES (2)")  # no synchronous wait left
        roles = {n: s["role"] for n, s in postgres_cluster.status(cfg).items()}
        assert roles == {"postgres-primary": None, "postgres-standby": "primary"}
        # Then the next up rebuilds the pair the other way round
        postgres_cluster.up(cfg)
        roles = {n: s["role"] for n, s in postgres_cluster.status(cfg).items()}
        assert roles == {"postgres-primary": "standby", "postgres-standby": "primary"}
        assert postgres.psql(primary, "SELECT count(*) FROM kept") == "2"
    finally:
        postgres_cluster.down(cfg)
        for node in (primary, standby):
            base = postgres.home(node)
            if base.parent == postgres.VAR_BASE:
                shutil.rmtree(base, ignore_errors=True)
    assert not any(s["running"] for s in postgres_cluster.status(cfg).values())
