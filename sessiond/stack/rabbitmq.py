"""RabbitMQ for the local stack, TLS included, every listener on 127.0.0.1.

The node is started directly (``/usr/lib/rabbitmq/bin/rabbitmq-server``; the ``/usr/sbin``
wrapper switches user and directory). Besides AMQP, AMQPS and management, Erlang opens the
distribution port and starts ``epmd``: both are held to loopback too, and ``stop`` ends the
``epmd`` that starting the node brought up once no other node is registered with it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Literal

from sessiond.stack.config import PASSWORD, USER, VHOSTS, StackConfig
from sessiond.stack.proc import StackError, kill_pidfile, port_open, read_pid, run, wait
from sessiond.stack.tls import make_cert

SERVER = "rabbitmq"
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
# The distribution listener (the node's, and each rabbitmqctl's own short-lived node) binds
# every interface unless told otherwise.
LOOPBACK_DIST = "-kernel inet_dist_use_interface {127,0,0,1}"


def _env(cfg: StackConfig) -> dict[str, str]:
    base = cfg.dir("rabbitmq")
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")},
        "HOME": str(base),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_NODENAME": cfg.rabbit_node,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(cfg.amqp_port),
        "RABBITMQ_DIST_PORT": str(cfg.dist_port),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": LOOPBACK_DIST,
        "RABBITMQ_CTL_ERL_ARGS": LOOPBACK_DIST,
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
        "RABBITMQ_PID_FILE": str(cfg.pidfile("rabbitmq")),
    }


def _conf(cfg: StackConfig) -> str:
    tls = cfg.tls_dir
    return "\n".join(
        [
            "loopback_users = none",
            f"listeners.tcp.default = 127.0.0.1:{cfg.amqp_port}",
            f"listeners.ssl.default = 127.0.0.1:{cfg.amqps_port}",
            f"ssl_options.cacertfile = {tls / 'ca.pem'}",
            f"ssl_options.certfile = {tls / 'server.pem'}",
            f"ssl_options.keyfile = {tls / 'server.key'}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = false",
            "ssl_options.versions.1 = tlsv1.3",
            "ssl_options.versions.2 = tlsv1.2",
            f"management.tcp.port = {cfg.mgmt_port}",
            "management.tcp.ip = 127.0.0.1",
            "",
        ]
    )


def rabbitmqctl(
    cfg: StackConfig,
    *args: str,
    check: bool = True,
    timeout: float = 60,
    tool: Literal["rabbitmqctl", "rabbitmq-queues"] = "rabbitmqctl",
) -> subprocess.CompletedProcess[str]:
    """One of RabbitMQ's CLI tools (``rabbitmqctl``, ``rabbitmq-queues``) against this node."""
    return run(
        [str(RABBIT_BIN / tool), *args],
        server=SERVER,
        logfile=cfg.logfile("rabbitmq"),
        env=_env(cfg),
        check=check,
        timeout=timeout,
    )


def start(cfg: StackConfig) -> None:
    base = cfg.dir("rabbitmq")
    base.mkdir(parents=True, exist_ok=True)
    make_cert(cfg.tls_dir, "server", cn="localhost", san="DNS:localhost,IP:127.0.0.1")
    make_cert(cfg.tls_dir, "client", cn="sessiond-client")
    (base / "rabbitmq.conf").write_text(_conf(cfg))
    (base / "enabled_plugins").write_text(
        "[rabbitmq_management,rabbitmq_consistent_hash_exchange].\n"
    )
    if running(cfg):
        return
    logf = cfg.logfile("rabbitmq")
    with open(logf, "ab") as out:
        proc = subprocess.Popen(
            [str(RABBIT_BIN / "rabbitmq-server")],
            env=_env(cfg),
            cwd=base,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    cfg.pidfile("rabbitmq").write_text(f"{proc.pid}\n")

    def ready() -> bool:
        if proc.poll() is not None:
            raise StackError(SERVER, f"rabbitmq-server exited ({proc.returncode})", logf)
        # On a loaded machine the probe itself can outlast its own bound: that means "not yet",
        # not "failed"; the overall deadline below decides.
        try:
            probe = rabbitmqctl(cfg, "await_startup", "--timeout", "5", check=False, timeout=15)
        except StackError:
            return False
        return probe.returncode == 0

    wait(ready, SERVER, 90, logf)
    users = rabbitmqctl(cfg, "list_users", "-q").stdout
    if not any(line.split("\t")[0] == USER for line in users.splitlines()):
        rabbitmqctl(cfg, "add_user", USER, PASSWORD)
        rabbitmqctl(cfg, "set_user_tags", USER, "administrator")
    for vhost in VHOSTS:
        rabbitmqctl(cfg, "add_vhost", vhost, check=False)
        rabbitmqctl(cfg, "set_permissions", "-p", vhost, USER, ".*", ".*", ".*")


def running(cfg: StackConfig) -> bool:
    return read_pid(cfg.pidfile("rabbitmq")) is not None and port_open(cfg.amqps_port)


def stop(cfg: StackConfig) -> None:
    if read_pid(cfg.pidfile("rabbitmq")) is not None:
        rabbitmqctl(cfg, "stop", check=False, timeout=60)
        kill_pidfile(cfg.pidfile("rabbitmq"), timeout=30)
    stop_idle_epmd()


def _epmd() -> str | None:
    for cand in (Path("/usr/bin/epmd"), *sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))):
        if cand.exists():
            return str(cand)
    return None


def stop_idle_epmd() -> bool:
    """Ends epmd when no Erlang node is registered with it any more: the one our node started
    when none ran, never one that other nodes on this machine (other stacks, other users) still
    use. ``epmd -kill`` itself also refuses while a node is registered."""
    epmd = _epmd()
    if epmd is None:
        return False
    env = {**os.environ, "ERL_EPMD_ADDRESS": "127.0.0.1"}
    names = subprocess.run(
        [epmd, "-names"], env=env, capture_output=True, text=True, timeout=10, check=False
    )
    if names.returncode != 0:  # not running
        return False
    if any(line.startswith("name ") for line in names.stdout.splitlines()):
        return False
    killed = subprocess.run(
        [epmd, "-kill"], env=env, capture_output=True, text=True, timeout=10, check=False
    )
    return killed.returncode == 0
