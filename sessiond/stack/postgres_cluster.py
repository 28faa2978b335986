"""PostgreSQL primary + synchronous hot standby for the local cluster (CONTRACT §10).

Both servers are ``sessiond.stack.postgres`` clusters (same databases, user and data placement,
``/root`` 0700 included), each from a ``StackConfig`` of its own: ``postgres-primary`` is initdb'd,
``postgres-standby`` is a ``pg_basebackup -R`` of it (streaming, ``standby.signal``). Once the
standby streams, the primary sets ``synchronous_standby_names = '*'`` with
``synchronous_commit = on``: a commit is acknowledged only once the standby has it, so a failover
loses nothing a client was told was committed.

The names are the servers' places, not their roles: after ``promote`` the standby is the
primary, and ``status`` reads each role from the server (``pg_is_in_recovery()``). ``promote``
also clears ``synchronous_standby_names`` on the new primary, which has no standby yet (else every
commit would wait forever). ``up`` after a failover rebuilds the pair: the server that is no
longer a standby of the live primary is wiped and cloned again from it.
"""

from __future__ import annotations

import os
import shutil
import signal
from functools import partial
from pathlib import Path
from typing import Any

from sessiond.stack import postgres
from sessiond.stack.cluster_config import ClusterConfig
from sessiond.stack.config import StackConfig
from sessiond.stack.proc import StackError, read_pid, run, wait

PLACES = ("primary", "standby")


def name(place: str) -> str:
    return f"postgres-{place}"


def _data(node: StackConfig) -> Path:
    return postgres.home(node) / "postgres"


def _is_standby_dir(node: StackConfig) -> bool:
    return (_data(node) / "standby.signal").exists()


def _has_data(node: StackConfig) -> bool:
    return (_data(node) / "PG_VERSION").exists()


def pid(node: StackConfig) -> int | None:
    return read_pid(_data(node) / "postmaster.pid")


def role(node: StackConfig) -> str | None:
    """``primary`` or ``standby``, asked of the running server."""
    if not postgres.running(node):
        return None
    try:
        recovering = postgres.psql(node, "SELECT pg_is_in_recovery()")
    except StackError:
        return None
    return {"t": "standby", "f": "primary"}.get(recovering)


def _clone(node: StackConfig, source: StackConfig) -> None:
    """``node`` becomes a fresh streaming standby of ``source`` (its old data, if any, goes)."""
    user = postgres.pg_user()
    base = postgres.choose_home(node, user)
    data, sock = base / "postgres", base / "pgsock"
    if data.exists():
        postgres.stop(node)
        shutil.rmtree(data)
    for d in (data, sock):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if user:
            shutil.chown(d, user, user)
    data.chmod(0o700)
    run(
        [str(postgres.pg_bin() / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(source.pg_port),
         "-U", "postgres", "-D", str(data), "-R", "-X", "stream", "-c", "fast"],
        server=name("standby"),
        logfile=postgres.logfile(node),
        user=user,
        timeout=300,
    )  # fmt: skip
    # The clone carries the source's postgresql.auto.conf: a standby must not wait for itself.
    auto = data / "postgresql.auto.conf"
    lines = [ln for ln in auto.read_text().splitlines() if "synchronous_standby_names" not in ln]
    auto.write_text("\n".join(lines) + "\n")


def _make_synchronous(primary: StackConfig) -> None:
    postgres.psql(primary, "ALTER SYSTEM SET synchronous_standby_names = '*'")
    postgres.psql(primary, "ALTER SYSTEM SET synchronous_commit = 'on'")
    postgres.psql(primary, "SELECT pg_reload_conf()")


def _streaming(primary: StackConfig) -> bool:
    try:
        state = postgres.psql(primary, "SELECT sync_state FROM pg_stat_replication")
    except StackError:
        return False
    return "sync" in state.split()


def _order(cfg: ClusterConfig) -> tuple[StackConfig, StackConfig]:
    """(the primary, the other one) as the data directories say: the one without
    ``standby.signal``; if both lack it (a failover happened), the running one, else the one
    on the later timeline."""
    a, b = cfg.postgres("primary"), cfg.postgres("standby")
    if not _has_data(a) and not _has_data(b):
        return a, b
    candidates = [n for n in (a, b) if _has_data(n) and not _is_standby_dir(n)]
    if len(candidates) == 1:
        return candidates[0], b if candidates[0] is a else a
    live = [n for n in candidates if postgres.running(n)]
    if len(live) == 1:
        return live[0], b if live[0] is a else a
    newest = max(candidates, key=_timeline)
    return newest, b if newest is a else a


def _timeline(node: StackConfig) -> int:
    controldata = [str(postgres.pg_bin() / "pg_controldata"), str(_data(node))]
    out = run(controldata, server="postgres", user=postgres.pg_user(), check=False).stdout
    for line in out.splitlines():
        if line.startswith("Latest checkpoint's TimeLineID"):
            return int(line.split(":")[1])
    return 0


def up(cfg: ClusterConfig) -> None:
    """Idempotent: the primary, then a synchronous standby streaming from it."""
    for place in PLACES:
        cfg.postgres(place).root.mkdir(parents=True, exist_ok=True)
    primary, other = _order(cfg)
    postgres.start(primary)
    if _has_data(other) and not _is_standby_dir(other):
        _clone(other, primary)  # a former primary: its timeline has diverged
    if not _has_data(other):
        _clone(other, primary)
    postgres.start(other)
    if role(other) != "standby":
        raise StackError(name("standby"), "did not start as a standby", postgres.logfile(other))
    _make_synchronous(primary)
    wait(lambda: _streaming(primary), "postgres-standby", 60, postgres.logfile(other))


def down(cfg: ClusterConfig) -> None:
    """The standby first, so that the primary's last commits are not left waiting for it."""
    primary, other = _order(cfg)
    postgres.stop(other)
    postgres.stop(primary)


def kill_primary(cfg: ClusterConfig) -> int:
    """SIGKILLs the running primary's postmaster, as a crash would (its backends notice and
    exit); returns its pid."""
    for place in PLACES:
        node = cfg.postgres(place)
        found = pid(node)
        if found is not None and role(node) == "primary":
            os.kill(found, signal.SIGKILL)
            return found
    raise StackError("postgres-primary", "no running primary to kill")


def promote(cfg: ClusterConfig) -> StackConfig:
    """Promotes the running standby (``pg_ctl promote``), as an operator or a failover manager
    would once the primary is gone; returns the new primary."""
    node = next((n for n in (cfg.postgres(p) for p in PLACES) if role(n) == "standby"), None)
    if node is None:
        raise StackError("postgres-standby", "no running standby to promote")
    run(
        [str(postgres.pg_bin() / "pg_ctl"), "-D", str(_data(node)), "-w", "promote"],
        server=name("standby"),
        logfile=postgres.logfile(node),
        user=postgres.pg_user(),
    )
    wait(lambda: role(node) == "primary", "postgres-standby", 30, postgres.logfile(node))
    postgres.psql(node, "ALTER SYSTEM SET synchronous_standby_names = ''")
    postgres.psql(node, "SELECT pg_reload_conf()")
    return node


def ensure_database(cfg: ClusterConfig, db: str) -> None:
    """``db`` on the primary, then seen by every running standby. A synchronous commit is
    flushed on the standby, not yet replayed; until it is, a multi-host URL that lists the
    standby first fails on it with "database does not exist" (asyncpg moves on to the next host
    only when a server is starting up), which a test's fresh database would otherwise hit."""
    primary = next(n for n in (cfg.postgres(p) for p in PLACES) if role(n) == "primary")
    postgres.ensure_database(primary, db)
    for node in (cfg.postgres(p) for p in PLACES):
        if role(node) == "standby":
            wait(partial(postgres.has_database, node, db), name("standby"), 30,
                 postgres.logfile(node))  # fmt: skip


def status(cfg: ClusterConfig) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for place in PLACES:
        node = cfg.postgres(place)
        live = postgres.running(node)
        out[name(place)] = {
            "pid": pid(node) if live else None,
            "role": role(node) if live else None,
            "data_dir": str(_data(node)),
            "port": node.pg_port,
            "running": live,
        }
    return out


def dsn_hosts(cfg: ClusterConfig) -> str:
    """``host:port,host:port`` of both servers, for a multi-host ``SESSIOND_DATABASE_URL``."""
    return ",".join(f"127.0.0.1:{cfg.postgres(p).pg_port}" for p in PLACES)
