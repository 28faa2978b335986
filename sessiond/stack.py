"""The local stack: real RabbitMQ, Redis and PostgreSQL on 127.0.0.1, no systemd, no root daemons.

Everything lives under one directory (``SESSIOND_STACK_DIR``, default ``.stack``) so that ``down``
stops exactly what ``up`` started and a fresh clone starts clean. The same stack serves the tests,
which use their own vhost, database and Redis db number.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGES = ("rabbitmq-server", "redis-server", "postgresql", "openssl")
SERVERS = ("postgres", "redis", "rabbitmq")
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
USER = "sessiond"
PASSWORD = "sessiond"  # noqa: S105 - local stack on 127.0.0.1 only
VHOSTS = ("sessiond", "sessiond_test")
DATABASES = ("sessiond", "sessiond_test")


class StackError(RuntimeError):
    """A server would not start or stop; the message says which and where its log is."""


def _port(name: str, default: int) -> int:
    return int(os.environ.get(f"SESSIOND_STACK_{name}_PORT", default))


@dataclass(frozen=True, slots=True)
class StackConfig:
    """Paths and ports; every port can be moved by ``SESSIOND_STACK_<NAME>_PORT``."""

    root: Path
    amqp_port: int = 5672
    amqps_port: int = 5671
    mgmt_port: int = 15672
    dist_port: int = 25672
    redis_port: int = 6379
    pg_port: int = 5432

    @classmethod
    def from_env(cls) -> StackConfig:
        root = Path(os.environ.get("SESSIOND_STACK_DIR", ".stack")).resolve()
        return cls(
            root=root,
            amqp_port=_port("AMQP", 5672),
            amqps_port=_port("AMQPS", 5671),
            mgmt_port=_port("MGMT", 15672),
            dist_port=_port("DIST", 25672),
            redis_port=_port("REDIS", 6379),
            pg_port=_port("PG", 5432),
        )

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.pem"

    def dir(self, server: str) -> Path:
        return self.root / server

    def pidfile(self, server: str) -> Path:
        return self.root / f"{server}.pid"

    def logfile(self, server: str) -> Path:
        return self.root / f"{server}.log"

    @property
    def rabbit_node(self) -> str:
        """Two stacks on one host need two Erlang node names: the default AMQP port keeps
        ``sessiond@localhost``, any other port names the node after itself."""
        if self.amqp_port == 5672:
            return "sessiond@localhost"
        return f"sessiond{self.amqp_port}@localhost"

    def env_dict(self, *, test: bool = False) -> dict[str, str]:
        """The connection settings (CONTRACT §4) that reach this stack; TLS for AMQP."""
        vhost = VHOSTS[1] if test else VHOSTS[0]
        db = DATABASES[1] if test else DATABASES[0]
        return {
            "SESSIOND_AMQP_URL": f"amqps://{USER}:{PASSWORD}@localhost:{self.amqps_port}/{vhost}",
            "SESSIOND_AMQP_CA_FILE": str(self.ca_file),
            "SESSIOND_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/{15 if test else 0}",
            "SESSIOND_DATABASE_URL": f"postgres://{USER}:{PASSWORD}@127.0.0.1:{self.pg_port}/{db}",
        }

    def env_lines(self, *, test: bool = False) -> list[str]:
        return [f"export {k}={v}" for k, v in self.env_dict(test=test).items()]


# --------------------------------------------------------------------------- helpers


def _run(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
    user: str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    if user is not None and os.geteuid() == 0:
        cmd = ["runuser", "-u", user, "--", *cmd]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise StackError(
            f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()[-800:]}"
        )
    return result


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(check: object, what: str, timeout: float, logfile: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.25)
    tail = logfile.read_text(errors="replace")[-1500:] if logfile.exists() else ""
    raise StackError(f"{what} not ready after {timeout:.0f}s; see {logfile}\n{tail}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    return pid if _pid_alive(pid) else None


def ensure_packages() -> None:
    """Installs the Debian packages when a server binary is missing (needs root, like apt)."""
    missing = [
        p
        for p, probe in (
            ("rabbitmq-server", RABBIT_BIN / "rabbitmq-server"),
            ("redis-server", Path("/usr/bin/redis-server")),
            ("postgresql", _pg_bin()),
            ("openssl", Path("/usr/bin/openssl")),
        )
        if not probe.exists()
    ]
    if not missing:
        return
    log.info("installing Debian packages", extra={"packages": missing})
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], env=env, timeout=600)
    _run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        env=env,
        timeout=900,
    )


def _pg_bin() -> Path:
    base = Path("/usr/lib/postgresql")
    versions = sorted((p for p in base.glob("*/bin") if (p / "pg_ctl").exists()), reverse=True)
    return versions[0] if versions else base / "15" / "bin"


# --------------------------------------------------------------------------- TLS


def make_ca(tls: Path) -> None:
    key, cert = tls / "ca.key", tls / "ca.pem"
    if cert.exists():
        return
    tls.mkdir(parents=True, exist_ok=True)
    _run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            "/CN=sessiond local CA",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ]
    )


def make_cert(tls: Path, name: str, *, cn: str, san: str | None = None) -> tuple[Path, Path]:
    """A leaf certificate signed by the stack's CA; ``san`` like ``DNS:localhost,IP:127.0.0.1``."""
    key, csr, cert = tls / f"{name}.key", tls / f"{name}.csr", tls / f"{name}.pem"
    if cert.exists():
        return cert, key
    make_ca(tls)
    _run(
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={cn}",
            "-keyout",
            str(key),
            "-out",
            str(csr),
        ]
    )
    ext = tls / f"{name}.ext"
    lines = ["basicConstraints=CA:FALSE", "keyUsage=digitalSignature,keyEncipherment"]
    if san:
        lines.append(f"subjectAltName={san}")
    ext.write_text("\n".join(lines) + "\n")
    _run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(tls / "ca.pem"),
            "-CAkey",
            str(tls / "ca.key"),
            "-CAcreateserial",
            "-days",
            "825",
            "-extfile",
            str(ext),
            "-out",
            str(cert),
        ]
    )
    for path in (key, cert):
        path.chmod(0o644)
    return cert, key


# --------------------------------------------------------------------------- Redis


def _redis_start(cfg: StackConfig) -> None:
    if _read_pid(cfg.pidfile("redis")) and _port_open(cfg.redis_port):
        return
    data = cfg.dir("redis")
    data.mkdir(parents=True, exist_ok=True)
    _run(
        [
            "redis-server",
            "--port",
            str(cfg.redis_port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--save",
            "",
            "--appendonly",
            "no",
            # sessiond keeps state in Redis, not only a cache: never evict (storage.redis_policy)
            "--maxmemory",
            "1gb",
            "--maxmemory-policy",
            "noeviction",
            "--daemonize",
            "yes",
            "--pidfile",
            str(cfg.pidfile("redis")),
            "--logfile",
            str(cfg.logfile("redis")),
        ]
    )
    _wait(lambda: _port_open(cfg.redis_port), "redis", 20, cfg.logfile("redis"))


def _kill_pidfile(cfg: StackConfig, server: str, timeout: float = 20) -> None:
    pid = _read_pid(cfg.pidfile(server))
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    cfg.pidfile(server).unlink(missing_ok=True)


# --------------------------------------------------------------------------- PostgreSQL


def _pg_user() -> str | None:
    """initdb refuses root: run PostgreSQL as ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    return "postgres"


def _pg_start(cfg: StackConfig) -> None:
    data = cfg.dir("postgres")
    user = _pg_user()
    bin_ = _pg_bin()
    sock = cfg.root / "pgsock"
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        sock.mkdir(parents=True, exist_ok=True)
        if user:
            shutil.chown(data, user, user)
            shutil.chown(sock, user, user)
        _run(
            [str(bin_ / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            user=user,
        )
    logf = cfg.logfile("postgres")
    if not logf.exists():
        logf.touch()
        if user:
            shutil.chown(logf, user, user)
    status = _run([str(bin_ / "pg_ctl"), "-D", str(data), "status"], user=user, check=False)
    if status.returncode != 0:
        opts = (
            f"-p {cfg.pg_port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections=200"
            " -c fsync=on -c shared_buffers=128MB"
        )
        _run(
            [str(bin_ / "pg_ctl"), "-D", str(data), "-l", str(logf), "-o", opts, "-w", "start"],
            user=user,
        )
    psql = _psql(cfg)
    exists = _run([*psql, "-c", f"SELECT 1 FROM pg_roles WHERE rolname='{USER}'"]).stdout.strip()
    if not exists:
        _run([*psql, "-c", f"CREATE ROLE {USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}'"])
    for db in DATABASES:
        _ensure_database(cfg, db)


def _psql(cfg: StackConfig) -> list[str]:
    sock = cfg.root / "pgsock"
    return [
        str(_pg_bin() / "psql"),
        "-h",
        str(sock),
        "-p",
        str(cfg.pg_port),
        "-U",
        "postgres",
        "-Atq",
    ]


def _ensure_database(cfg: StackConfig, name: str) -> None:
    psql = _psql(cfg)
    if not _run([*psql, "-c", f"SELECT 1 FROM pg_database WHERE datname='{name}'"]).stdout.strip():
        _run([*psql, "-c", f'CREATE DATABASE "{name}" OWNER {USER}'])


def namespace_env(cfg: StackConfig, name: str, redis_db: int) -> dict[str, str]:
    """A private corner of the running stack: vhost and database ``name`` (created when missing)
    and Redis db ``redis_db``, as ``SESSIOND_*`` URLs. Lets test suites, load runs and benchmarks
    share one stack without touching each other's data."""
    rabbitmqctl(cfg, "add_vhost", name, check=False)
    rabbitmqctl(cfg, "set_permissions", "-p", name, USER, ".*", ".*", ".*")
    _ensure_database(cfg, name)
    env = cfg.env_dict()

    def retarget(url: str, last: str) -> str:
        return url.rsplit("/", 1)[0] + f"/{last}"

    env["SESSIOND_DATABASE_URL"] = retarget(env["SESSIOND_DATABASE_URL"], name)
    env["SESSIOND_AMQP_URL"] = retarget(env["SESSIOND_AMQP_URL"], name)
    env["SESSIOND_REDIS_URL"] = retarget(env["SESSIOND_REDIS_URL"], str(redis_db))
    return env


def _pg_stop(cfg: StackConfig) -> None:
    data = cfg.dir("postgres")
    if (data / "PG_VERSION").exists():
        _run(
            [str(_pg_bin() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            user=_pg_user(),
            check=False,
        )


def _pg_running(cfg: StackConfig) -> bool:
    return _port_open(cfg.pg_port) and (cfg.dir("postgres") / "postmaster.pid").exists()


# --------------------------------------------------------------------------- RabbitMQ


def _rabbit_env(cfg: StackConfig) -> dict[str, str]:
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
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
        "RABBITMQ_PID_FILE": str(cfg.pidfile("rabbitmq")),
    }


def _rabbit_conf(cfg: StackConfig) -> str:
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
    cfg: StackConfig, *args: str, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return _run(
        [str(RABBIT_BIN / "rabbitmqctl"), *args], env=_rabbit_env(cfg), check=check, timeout=timeout
    )


def _rabbit_start(cfg: StackConfig) -> None:
    base = cfg.dir("rabbitmq")
    base.mkdir(parents=True, exist_ok=True)
    make_cert(cfg.tls_dir, "server", cn="localhost", san="DNS:localhost,IP:127.0.0.1")
    make_cert(cfg.tls_dir, "client", cn="sessiond-client")
    (base / "rabbitmq.conf").write_text(_rabbit_conf(cfg))
    (base / "enabled_plugins").write_text(
        "[rabbitmq_management,rabbitmq_consistent_hash_exchange].\n"
    )
    if _rabbit_running(cfg):
        return
    env = _rabbit_env(cfg)
    with open(cfg.logfile("rabbitmq"), "ab") as out:
        proc = subprocess.Popen(
            [str(RABBIT_BIN / "rabbitmq-server")],
            env=env,
            cwd=base,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    cfg.pidfile("rabbitmq").write_text(f"{proc.pid}\n")

    def ready() -> bool:
        if proc.poll() is not None:
            raise StackError(
                f"rabbitmq-server exited ({proc.returncode}); see {cfg.logfile('rabbitmq')}"
            )
        return (
            rabbitmqctl(cfg, "await_startup", "--timeout", "5", check=False, timeout=15).returncode
            == 0
        )

    _wait(ready, "rabbitmq", 90, cfg.logfile("rabbitmq"))
    users = rabbitmqctl(cfg, "list_users", "-q").stdout
    if not any(line.split("\t")[0] == USER for line in users.splitlines()):
        rabbitmqctl(cfg, "add_user", USER, PASSWORD)
        rabbitmqctl(cfg, "set_user_tags", USER, "administrator")
    for vhost in VHOSTS:
        rabbitmqctl(cfg, "add_vhost", vhost, check=False)
        rabbitmqctl(cfg, "set_permissions", "-p", vhost, USER, ".*", ".*", ".*")


def _rabbit_running(cfg: StackConfig) -> bool:
    return _read_pid(cfg.pidfile("rabbitmq")) is not None and _port_open(cfg.amqps_port)


def _rabbit_stop(cfg: StackConfig) -> None:
    if _read_pid(cfg.pidfile("rabbitmq")) is None:
        return
    rabbitmqctl(cfg, "stop", check=False, timeout=60)
    _kill_pidfile(cfg, "rabbitmq", timeout=30)


# --------------------------------------------------------------------------- public API


def start(cfg: StackConfig, server: str) -> None:
    cfg.root.mkdir(parents=True, exist_ok=True)
    if cfg.root.stat().st_mode & 0o011 == 0:
        cfg.root.chmod(0o755)  # the postgres user must traverse it
    {"postgres": _pg_start, "redis": _redis_start, "rabbitmq": _rabbit_start}[server](cfg)


def stop(cfg: StackConfig, server: str) -> None:
    {"postgres": _pg_stop, "redis": lambda c: _kill_pidfile(c, "redis"), "rabbitmq": _rabbit_stop}[
        server
    ](cfg)


def running(cfg: StackConfig, server: str) -> bool:
    if server == "postgres":
        return _pg_running(cfg)
    if server == "redis":
        return _read_pid(cfg.pidfile("redis")) is not None and _port_open(cfg.redis_port)
    return _rabbit_running(cfg)


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
