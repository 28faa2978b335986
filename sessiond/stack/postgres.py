"""PostgreSQL for the local stack, run as the ``postgres`` user when we are root.

``initdb`` refuses to run as root, so as root the server runs as ``postgres``, which must reach
its data directory. Wherever the repository is, the data goes where ``postgres`` can reach it:
in the stack directory when ``postgres`` can traverse it, else (``/root`` is mode 0700 on
Debian, and a clone in ``/root/sessiond`` is what a new user has) in
``/var/lib/sessiond/<hash of the stack directory>/``. The choice is recorded in the stack
directory (``postgres.location``) so that ``down`` and later ``up`` find the same cluster, and it
is never made behind the user's back by changing the permissions of their directories.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from sessiond.stack.config import DATABASES, PASSWORD, USER, StackConfig
from sessiond.stack.proc import port_open, read_pid, run

SERVER = "postgres"
VAR_BASE = Path("/var/lib/sessiond")


def pg_bin() -> Path:
    base = Path("/usr/lib/postgresql")
    versions = sorted((p for p in base.glob("*/bin") if (p / "pg_ctl").exists()), reverse=True)
    return versions[0] if versions else base / "15" / "bin"


def pg_user() -> str | None:
    """initdb refuses root: run PostgreSQL as ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    return "postgres"


def _reachable_by(user: str, path: Path) -> bool:
    """Whether ``user`` can traverse every directory down to ``path``: asked of the kernel, as
    that user, rather than reimplemented from mode bits (ACLs, groups, mounts all count)."""
    probe = subprocess.run(
        ["runuser", "-u", user, "--", "test", "-x", str(path)], capture_output=True, check=False
    )
    return probe.returncode == 0


def home(cfg: StackConfig) -> Path:
    """The directory holding PostgreSQL's data (``postgres/``), socket (``pgsock/``) and log
    (``postgres.log``): the stack directory, or one under /var/lib/sessiond (see the module)."""
    return cfg.home(SERVER)


def choose_home(cfg: StackConfig, user: str | None) -> Path:
    """Decides once, on the first ``up``, and records the decision."""
    record = cfg.root / "postgres.location"
    if record.exists():
        return Path(record.read_text().strip())
    if (cfg.root / "postgres" / "PG_VERSION").exists() or user is None:
        return cfg.root
    if _reachable_by(user, cfg.root):
        return cfg.root
    digest = hashlib.sha256(str(cfg.root).encode()).hexdigest()[:16]
    base = VAR_BASE / digest
    if base.exists():
        # Left by a stack directory of the same path that was deleted for a clean slate (the
        # record went with it): that is what the user asked for.
        pid = read_pid(base / "postgres" / "postmaster.pid")
        if pid is not None:
            run([str(pg_bin() / "pg_ctl"), "-D", str(base / "postgres"), "-m", "fast", "-w",
                 "stop"], server=SERVER, user=user, check=False)  # fmt: skip
        shutil.rmtree(base)
    base.mkdir(parents=True, mode=0o755)
    VAR_BASE.chmod(0o755)
    (base / "stack-dir").write_text(f"{cfg.root}\n")
    record.write_text(f"{base}\n")
    return base


def logfile(cfg: StackConfig) -> Path:
    return cfg.logfile(SERVER)


def _psql(cfg: StackConfig) -> list[str]:
    sock = home(cfg) / "pgsock"
    return [str(pg_bin() / "psql"), "-h", str(sock), "-p", str(cfg.pg_port), "-U", "postgres",
            "-Atq"]  # fmt: skip


def psql(cfg: StackConfig, sql: str) -> str:
    return run([*_psql(cfg), "-c", sql], server=SERVER, logfile=logfile(cfg)).stdout.strip()


def start(cfg: StackConfig) -> None:
    user = pg_user()
    base = choose_home(cfg, user)
    data, sock, logf = base / "postgres", base / "pgsock", base / "postgres.log"
    bin_ = pg_bin()
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        sock.mkdir(parents=True, exist_ok=True)
        if user:
            shutil.chown(data, user, user)
            shutil.chown(sock, user, user)
        run(
            [str(bin_ / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            server=SERVER,
            logfile=logf,
            user=user,
        )
    if not logf.exists():
        logf.touch()
        if user:
            shutil.chown(logf, user, user)
    status = run([str(bin_ / "pg_ctl"), "-D", str(data), "status"], server=SERVER, user=user,
                 check=False)  # fmt: skip
    if status.returncode != 0:
        opts = (
            f"-p {cfg.pg_port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections=200"
            " -c fsync=on -c shared_buffers=128MB"
        )
        run(
            [str(bin_ / "pg_ctl"), "-D", str(data), "-l", str(logf), "-o", opts, "-w", "start"],
            server=SERVER,
            logfile=logf,
            user=user,
        )
    if not psql(cfg, f"SELECT 1 FROM pg_roles WHERE rolname='{USER}'"):
        psql(cfg, f"CREATE ROLE {USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
    for db in DATABASES:
        ensure_database(cfg, db)


def has_database(cfg: StackConfig, name: str) -> bool:
    return psql(cfg, f"SELECT 1 FROM pg_database WHERE datname='{name}'") == "1"


def ensure_database(cfg: StackConfig, name: str) -> None:
    if not has_database(cfg, name):
        psql(cfg, f'CREATE DATABASE "{name}" OWNER {USER}')


def stop(cfg: StackConfig) -> None:
    data = home(cfg) / "postgres"
    if (data / "PG_VERSION").exists():
        run([str(pg_bin() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            server=SERVER, user=pg_user(), check=False)  # fmt: skip


def running(cfg: StackConfig) -> bool:
    return port_open(cfg.pg_port) and (home(cfg) / "postgres" / "postmaster.pid").exists()
