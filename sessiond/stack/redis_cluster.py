"""Redis Cluster for the local cluster: 3 masters + 3 replicas on 127.0.0.1 (CONTRACT §10).

Six daemonized ``redis-server`` nodes on consecutive ports from ``ClusterConfig.redis_port``
(cluster bus at port + 10000), joined once by ``redis-cli --cluster create``. Like the
single-node stack, no persistence and no eviction: the data is sessiond's state, and a node
restarted by ``up`` rejoins from its ``nodes.conf`` (roles as the cluster last knew them).

A short ``cluster-node-timeout`` (2 s, instead of 15 s) lets a replica take over a dead master
within the time budget of the fault tests; on 127.0.0.1 there is no network jitter to absorb.

API for tests and the CLI: ``up``, ``down``, ``status``, ``startup_nodes``, ``node_pid``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sessiond.stack.cluster_config import ClusterConfig
from sessiond.stack.proc import StackError, kill_pidfile, port_open, read_pid, run, wait

SERVER = "redis-cluster"
NODE_TIMEOUT_MS = 2000
SLOTS = 16384


def name(port: int) -> str:
    return f"redis-{port}"


def data_dir(cfg: ClusterConfig, port: int) -> Path:
    return cfg.root / name(port)


def pidfile(cfg: ClusterConfig, port: int) -> Path:
    return cfg.root / f"{name(port)}.pid"


def logfile(cfg: ClusterConfig, port: int) -> Path:
    return cfg.root / f"{name(port)}.log"


def startup_nodes(cfg: ClusterConfig) -> list[tuple[str, int]]:
    """Every node as ``(host, port)``: a client given all of them still starts with nodes dead."""
    return [("127.0.0.1", p) for p in cfg.redis_ports()]


def urls(cfg: ClusterConfig) -> str:
    """The nodes as ``SESSIOND_REDIS_URL`` lists them for a cluster: comma-separated URLs."""
    return ",".join(f"redis://{h}:{p}" for h, p in startup_nodes(cfg))


def node_pid(cfg: ClusterConfig, port: int) -> int | None:
    return read_pid(pidfile(cfg, port))


def cli(port: int, *args: str, check: bool = True, timeout: float = 10) -> str:
    return run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        server=name(port),
        check=check,
        timeout=timeout,
    ).stdout


def _info(port: int) -> dict[str, str]:
    """``CLUSTER INFO`` of one node; empty when it does not answer."""
    try:
        text = cli(port, "cluster", "info", check=False, timeout=5)
    except StackError:
        return {}
    pairs = (line.strip().split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: v for k, v in pairs}


def _start_node(cfg: ClusterConfig, port: int) -> None:
    if running(cfg, port):
        return
    data = data_dir(cfg, port)
    data.mkdir(parents=True, exist_ok=True)
    logf = logfile(cfg, port)
    run(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
         "--save", "", "--appendonly", "no",
         "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
         "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
         # sessiond keeps state in Redis, not only a cache: never evict (storage.redis_policy)
         "--maxmemory", "1gb", "--maxmemory-policy", "noeviction",
         "--daemonize", "yes", "--pidfile", str(pidfile(cfg, port)), "--logfile", str(logf)],
        server=name(port),
        logfile=logf,
    )  # fmt: skip
    wait(lambda: port_open(port), name(port), 20, logf)


def _formed(cfg: ClusterConfig) -> bool:
    """Whether the slots were ever assigned (then the nodes rejoin by themselves)."""
    return any(_info(p).get("cluster_slots_assigned") == str(SLOTS) for p in cfg.redis_ports())


def up(cfg: ClusterConfig) -> None:
    """Idempotent: starts the nodes that are not running, creates the cluster once, and returns
    when every running node says ``cluster_state:ok``."""
    cfg.root.mkdir(parents=True, exist_ok=True)
    ports = cfg.redis_ports()
    for port in ports:
        _start_node(cfg, port)
    if not _formed(cfg):
        run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            server=SERVER,
            logfile=logfile(cfg, ports[0]),
            timeout=120,
        )  # fmt: skip
    wait_ok(cfg, timeout=60)


def wait_ok(cfg: ClusterConfig, timeout: float = 30) -> None:
    """Until every running node reports ``cluster_state:ok`` (after a failover, too)."""

    def ok() -> bool:
        live = [p for p in cfg.redis_ports() if running(cfg, p)]
        return bool(live) and all(_info(p).get("cluster_state") == "ok" for p in live)

    wait(ok, SERVER, timeout, logfile(cfg, cfg.redis_port))


def down(cfg: ClusterConfig) -> None:
    for port in cfg.redis_ports():
        kill_pidfile(pidfile(cfg, port))


def running(cfg: ClusterConfig, port: int) -> bool:
    return node_pid(cfg, port) is not None and port_open(port)


def role(port: int) -> str | None:
    """The live role, asked of the node (``ROLE``): ``master`` or ``replica``; it changes on a
    failover, so it is never inferred from the order the nodes were created in."""
    try:
        first = cli(port, "role", check=False, timeout=5).split("\n", 1)[0].strip()
    except StackError:
        return None
    return {"master": "master", "slave": "replica"}.get(first)


def status(cfg: ClusterConfig) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for port in cfg.redis_ports():
        live = running(cfg, port)
        out[name(port)] = {
            "pid": node_pid(cfg, port) if live else None,
            "role": role(port) if live else None,
            "data_dir": str(data_dir(cfg, port)),
            "port": port,
            "running": live,
        }
    return out


def masters(cfg: ClusterConfig) -> list[int]:
    """The ports of the live masters, e.g. for a test that kills one."""
    return [p for p in cfg.redis_ports() if running(cfg, p) and role(p) == "master"]
