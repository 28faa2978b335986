"""The local stack: real RabbitMQ, Redis and PostgreSQL on 127.0.0.1, no systemd, no root daemons.

Everything lives under one directory (``SESSIOND_STACK_DIR``, default ``.stack``) so that ``down``
stops exactly what ``up`` started and a fresh clone starts clean. (PostgreSQL's data may live
under /var/lib/sessiond instead, when the ``postgres`` user cannot reach the stack directory:
see ``sessiond.stack.postgres``.) The same stack serves the tests, which use their own vhost,
database and Redis db number. One module per server; this one is the public face.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from sessiond.stack import postgres, rabbitmq, redis_server
from sessiond.stack.config import DATABASES, PASSWORD, USER, VHOSTS, StackConfig
from sessiond.stack.proc import StackError, run
from sessiond.stack.proc import port_open as _port_open
from sessiond.stack.proc import wait as _wait
from sessiond.stack.rabbitmq import RABBIT_BIN, rabbitmqctl
from sessiond.stack.tls import make_ca, make_cert

__all__ = [
    "DATABASES",
    "PACKAGES",
    "PASSWORD",
    "RABBIT_BIN",
    "SERVERS",
    "USER",
    "VHOSTS",
    "StackConfig",
    "StackError",
    "_port_open",
    "_wait",
    "down",
    "ensure_packages",
    "logfile",
    "make_ca",
    "make_cert",
    "namespace_env",
    "rabbitmqctl",
    "running",
    "start",
    "status",
    "stop",
    "up",
]

log = logging.getLogger(__name__)

PACKAGES = ("rabbitmq-server", "redis-server", "postgresql", "openssl")
SERVERS = ("postgres", "redis", "rabbitmq")

_START: dict[str, Callable[[StackConfig], None]] = {
    "postgres": postgres.start,
    "redis": redis_server.start,
    "rabbitmq": rabbitmq.start,
}
_STOP: dict[str, Callable[[StackConfig], None]] = {
    "postgres": postgres.stop,
    "redis": redis_server.stop,
    "rabbitmq": rabbitmq.stop,
}
_RUNNING: dict[str, Callable[[StackConfig], bool]] = {
    "postgres": postgres.running,
    "redis": redis_server.running,
    "rabbitmq": rabbitmq.running,
}


def logfile(cfg: StackConfig, server: str) -> Path:
    """Where a server writes its log (PostgreSQL's may be outside the stack directory)."""
    return postgres.logfile(cfg) if server == "postgres" else cfg.logfile(server)


def ensure_packages() -> None:
    """Installs the Debian packages when a server binary is missing (needs root, like apt)."""
    missing = [
        p
        for p, probe in (
            ("rabbitmq-server", RABBIT_BIN / "rabbitmq-server"),
            ("redis-server", Path("/usr/bin/redis-server")),
            ("postgresql", postgres.pg_bin()),
            ("openssl", Path("/usr/bin/openssl")),
        )
        if not probe.exists()
    ]
    if not missing:
        return
    log.info("installing Debian packages", extra={"packages": missing})
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], server="apt-get", env=env, timeout=600)
    run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        server="apt-get",
        env=env,
        timeout=900,
    )


def namespace_env(cfg: StackConfig, name: str, redis_db: int) -> dict[str, str]:
    """A private corner of the running stack: vhost and database ``name`` (created when missing)
    and Redis db ``redis_db``, as ``SESSIOND_*`` URLs. Lets test suites, load runs and benchmarks
    share one stack without touching each other's data."""
    rabbitmqctl(cfg, "add_vhost", name, check=False)
    rabbitmqctl(cfg, "set_permissions", "-p", name, USER, ".*", ".*", ".*")
    postgres.ensure_database(cfg, name)
    env = cfg.env_dict()

    def retarget(url: str, last: str) -> str:
        return url.rsplit("/", 1)[0] + f"/{last}"

    env["SESSIOND_DATABASE_URL"] = retarget(env["SESSIOND_DATABASE_URL"], name)
    env["SESSIOND_AMQP_URL"] = retarget(env["SESSIOND_AMQP_URL"], name)
    env["SESSIOND_REDIS_URL"] = retarget(env["SESSIOND_REDIS_URL"], str(redis_db))
    return env


def start(cfg: StackConfig, server: str) -> None:
    cfg.root.mkdir(parents=True, exist_ok=True)
    _START[server](cfg)


def stop(cfg: StackConfig, server: str) -> None:
    _STOP[server](cfg)


def running(cfg: StackConfig, server: str) -> bool:
    return _RUNNING[server](cfg)


def up(cfg: StackConfig, *, install: bool = True) -> None:
    """Idempotent: starts what is not running, leaves the rest alone."""
    if install:
        ensure_packages()
    for server in SERVERS:
        start(cfg, server)
        log.info("server ready", extra={"server": server})


def down(cfg: StackConfig) -> None:
    for server in reversed(SERVERS):
        stop(cfg, server)
        log.info("server stopped", extra={"server": server})


def status(cfg: StackConfig) -> Iterator[tuple[str, bool]]:
    for server in SERVERS:
        yield server, running(cfg, server)
