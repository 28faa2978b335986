"""A 3-node RabbitMQ cluster for the local cluster (CONTRACT §10), every listener on 127.0.0.1.

Each node is started by ``sessiond.stack.rabbitmq`` exactly as the single-node stack starts its
one node (same TLS, user and vhosts), from a ``StackConfig`` of its own: its own directory, its own
ports and hence its own Erlang node name (``sessiond<amqp port>@localhost``). What a cluster adds
is one shared Erlang cookie (written into each node's ``HOME`` before it first starts) and
``rabbitmqctl join_cluster`` of nodes 2 and 3 to node 1 (which resets them: the user and vhosts
then come from the cluster's own metadata).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sessiond.stack import rabbitmq
from sessiond.stack.cluster_config import RABBIT_NODES, ClusterConfig
from sessiond.stack.config import StackConfig
from sessiond.stack.proc import StackError, read_pid, wait
from sessiond.stack.tls import make_cert

log = logging.getLogger(__name__)


def name(n: int) -> str:
    return f"rabbitmq-{n}"


def nodes(cfg: ClusterConfig) -> list[StackConfig]:
    return [cfg.rabbit(n) for n in range(1, RABBIT_NODES + 1)]


def _cookie(cfg: ClusterConfig) -> str:
    path = cfg.root / "erlang.cookie"
    if not path.exists():
        cfg.root.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(20).upper())
        path.chmod(0o600)
    return path.read_text().strip()


def _write_cookie(node: StackConfig, cookie: str) -> None:
    """Erlang reads ``$HOME/.erlang.cookie`` (mode 0400): the node and its rabbitmqctl share
    ``HOME``, so one file per node serves both."""
    home = node.dir("rabbitmq")
    home.mkdir(parents=True, exist_ok=True)
    path = home / ".erlang.cookie"
    if path.exists() and path.read_text().strip() == cookie:
        return
    if path.exists():
        path.chmod(0o600)
    path.write_text(cookie)
    path.chmod(0o400)


def cluster_status(node: StackConfig) -> dict[str, Any]:
    out = rabbitmq.rabbitmqctl(node, "cluster_status", "--formatter", "json", timeout=60)
    status: dict[str, Any] = json.loads(out.stdout)
    return status


def _members(node: StackConfig) -> set[str]:
    return set(cluster_status(node).get("disk_nodes", []))


def _start(node: StackConfig, attempts: int = 4) -> None:
    """Starts one member, again if its boot fails: RabbitMQ 3.10 can stop a booting node with
    ``incompatible_feature_flags`` / ``badrpc`` when the peer it syncs feature flags with is
    itself still booting (seen here after a restart of all three at once); once the peer is up
    the next boot succeeds. Only a boot that ended (``rabbitmq-server`` exited) is retried."""
    for attempt in range(1, attempts + 1):
        try:
            rabbitmq.start(node)
            return
        except StackError as exc:
            if attempt == attempts or "exited" not in exc.problem:
                raise
            log.warning(
                "rabbitmq node boot failed; retrying",
                extra={"node": node.rabbit_node, "attempt": attempt},
            )
            time.sleep(3)


def up(cfg: ClusterConfig) -> None:
    """Idempotent: starts the nodes that are not running and joins the ones not yet clustered."""
    cookie = _cookie(cfg)
    first, *others = nodes(cfg)
    # The shared certificates once, before three starts would race to write them.
    make_cert(cfg.tls_dir, "server", cn="localhost", san="DNS:localhost,IP:127.0.0.1")
    make_cert(cfg.tls_dir, "client", cn="sessiond-client")
    for node in nodes(cfg):
        _write_cookie(node, cookie)
    # In parallel: each boot takes seconds of mostly waiting, and a restarted member waits for
    # its peers anyway.
    with ThreadPoolExecutor(max_workers=RABBIT_NODES) as pool:
        for done in [pool.submit(_start, node) for node in nodes(cfg)]:
            done.result()
    for node in others:
        if first.rabbit_node in _members(node):
            continue
        rabbitmq.rabbitmqctl(node, "stop_app")
        rabbitmq.rabbitmqctl(node, "join_cluster", first.rabbit_node, timeout=120)
        rabbitmq.rabbitmqctl(node, "start_app", timeout=120)
    want = {n.rabbit_node for n in nodes(cfg)}

    def joined() -> bool:
        try:
            return set(cluster_status(first).get("running_nodes", [])) >= want
        except StackError:
            return False

    wait(joined, "rabbitmq-cluster", 60, first.logfile("rabbitmq"))
    wait_whole(cfg)


def quorum_critical(node: StackConfig) -> list[str]:
    """The quorum queues that would lose their majority if ``node`` stopped now (RabbitMQ's own
    check before a node is taken down); empty when it can go."""
    out = rabbitmq.rabbitmqctl(
        node, "check_if_node_is_quorum_critical", check=False, tool="rabbitmq-queues"
    )
    if out.returncode == 0:
        return []
    said = f"{out.stdout}\n{out.stderr}"  # (the queues come on stderr, the heading on stdout)
    return [line.strip() for line in said.splitlines() if "would lose quorum" in line] or [
        said.strip()
    ]


def wait_whole(cfg: ClusterConfig, timeout: float = 60) -> None:
    """Until every quorum queue has all its members online, so that any one node may fail: a
    node that just restarted (or a queue just declared) can take seconds to bring its members
    back, and a second node lost meanwhile stops those queues, publishers and consumers alike
    waiting. A queue with a member offline makes each of its other members' nodes critical, so
    two nodes checked see every such queue."""
    first, second, *_ = nodes(cfg)
    last: list[str] = []

    def whole() -> bool:
        nonlocal last
        last = quorum_critical(first) + quorum_critical(second)
        return not last

    try:
        wait(whole, "rabbitmq-cluster quorum", timeout, first.logfile("rabbitmq"))
    except StackError as exc:
        raise StackError(exc.server, f"{exc.problem}: {'; '.join(last[:5])}", exc.logfile) from None


def down(cfg: ClusterConfig) -> None:
    """Stops node 3, 2, then 1: the last one down is the first one up (RabbitMQ's advice, so
    that a restarted cluster does not wait for a peer that knows newer metadata)."""
    for node in reversed(nodes(cfg)):
        rabbitmq.stop(node)


def pid(node: StackConfig) -> int | None:
    return read_pid(node.pidfile("rabbitmq"))


def kill(cfg: ClusterConfig, n: int) -> int:
    """SIGKILLs node ``n`` (1-based) and its Erlang VM, as a crash would; returns the pid. The
    pid file names ``rabbitmq-server``'s shell; the VM is its child in the same session, so the
    whole process group goes."""
    node = cfg.rabbit(n)
    found = pid(node)
    if found is None:
        raise StackError(name(n), "not running")
    os.killpg(os.getpgid(found), signal.SIGKILL)
    return found


def status(cfg: ClusterConfig) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for n, node in enumerate(nodes(cfg), start=1):
        live = rabbitmq.running(node)
        members: list[str] = []
        if live:
            try:
                members = sorted(cluster_status(node).get("running_nodes", []))
            except StackError:
                live = False
        out[name(n)] = {
            "pid": pid(node) if live else None,
            "role": "member" if live else None,
            "data_dir": str(node.dir("rabbitmq")),
            "node": node.rabbit_node,
            "amqp_port": node.amqp_port,
            "amqps_port": node.amqps_port,
            "running_nodes": members,
            "running": live,
        }
    return out
