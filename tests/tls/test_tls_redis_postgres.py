"""Redis (``rediss://``) and PostgreSQL (``sslmode=verify-full``) over TLS, on the Debian servers:
a private ``redis-server --tls-port`` started here, and the stack's PostgreSQL with ``ssl = on``
switched on for the test (``ALTER SYSTEM`` + reload) and off again after it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.exceptions

from loadtests.harness import free_port
from sessiond import stack
from sessiond.config import Settings
from storage import db as db_mod
from storage import redis_conn

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a ``localhost`` server certificate (DNS name only: 127.0.0.1 is a wrong name)."""
    tls = tmp_path_factory.mktemp("server-ca")
    stack.make_cert(tls, "server", cn="localhost", san="DNS:localhost")
    return tls


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="module")
def redis_tls(server_ca: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """``redis-server`` with only a TLS port (Debian builds it with TLS)."""
    port = free_port()
    data = tmp_path_factory.mktemp("redis-tls")
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(server_ca / "server.pem"),
         "--tls-key-file", str(server_ca / "server.key"),
         "--tls-ca-cert-file", str(server_ca / "ca.pem"), "--tls-auth-clients", "no",
         "--dir", str(data), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        stack._wait(lambda: stack._port_open(port), "redis tls", 10, data / "none.log")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def redis_settings(settings: Settings, url: str, ca: Path | None) -> Settings:
    return Settings(
        **{**settings.model_dump(), "redis_url": url, "redis_ca_file": str(ca) if ca else None}
    )


async def ping(settings: Settings) -> None:
    client = redis_conn.connect(settings)
    try:
        assert await client.ping()
    finally:
        await client.aclose()


async def test_redis_tls_verified(settings: Settings, redis_tls: int, server_ca: Path) -> None:
    await ping(redis_settings(settings, f"rediss://localhost:{redis_tls}/0", server_ca / "ca.pem"))


async def test_redis_tls_unknown_ca_refused(
    settings: Settings, redis_tls: int, other_ca: Path
) -> None:
    s = redis_settings(settings, f"rediss://localhost:{redis_tls}/0", other_ca / "ca.pem")
    with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
        await ping(s)


async def test_redis_tls_wrong_host_name_refused(
    settings: Settings, redis_tls: int, server_ca: Path
) -> None:
    s = redis_settings(settings, f"rediss://127.0.0.1:{redis_tls}/0", server_ca / "ca.pem")
    with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
        await ping(s)


# --------------------------------------------------------------------------- PostgreSQL


def _psql(cfg: stack.StackConfig, sql: str) -> None:
    base = f"postgres://{stack.USER}:{stack.PASSWORD}@127.0.0.1:{cfg.pg_port}/postgres"

    async def run() -> None:
        conn = await asyncpg.connect(base, ssl=False)
        try:
            for statement in sql.split(";"):
                if statement.strip():
                    await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="module")
def pg_tls(stack_config: stack.StackConfig, server_ca: Path) -> Iterator[stack.StackConfig]:
    """``ssl = on`` with the test certificate; PostgreSQL wants its key private to its owner."""
    data = stack_config.dir("postgres")
    cert, key = data / "test-server.pem", data / "test-server.key"
    shutil.copy(server_ca / "server.pem", cert)
    shutil.copy(server_ca / "server.key", key)
    key.chmod(0o600)
    owner = data.stat()
    os.chown(cert, owner.st_uid, owner.st_gid)
    os.chown(key, owner.st_uid, owner.st_gid)
    _psql(
        stack_config,
        f"ALTER SYSTEM SET ssl_cert_file = '{cert}'; ALTER SYSTEM SET ssl_key_file = '{key}';"
        " ALTER SYSTEM SET ssl = on; SELECT pg_reload_conf()",
    )
    try:
        yield stack_config
    finally:
        _psql(
            stack_config,
            "ALTER SYSTEM RESET ssl; ALTER SYSTEM RESET ssl_cert_file;"
            " ALTER SYSTEM RESET ssl_key_file; SELECT pg_reload_conf()",
        )
        cert.unlink(missing_ok=True)
        key.unlink(missing_ok=True)


def pg_settings(settings: Settings, host: str, query: str) -> Settings:
    url = settings.database_url.replace("@127.0.0.1:", f"@{host}:") + "?" + query
    return Settings(**{**settings.model_dump(), "database_url": url})


async def ssl_in_use(settings: Settings) -> bool:
    await db_mod.open_db(settings)
    try:
        rows = await db_mod.conn().execute_query_dict(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        return bool(rows[0]["ssl"])
    finally:
        await db_mod.close_db()


async def test_postgres_verify_full(
    migrated: Settings, pg_tls: stack.StackConfig, server_ca: Path
) -> None:
    ca = server_ca / "ca.pem"
    s = pg_settings(migrated, "localhost", f"sslmode=verify-full&sslrootcert={ca}")
    assert await ssl_in_use(s)


async def test_postgres_verify_full_refuses_unknown_ca_and_wrong_name(
    migrated: Settings, pg_tls: stack.StackConfig, server_ca: Path, other_ca: Path
) -> None:
    unknown = pg_settings(
        migrated, "localhost", f"sslmode=verify-full&sslrootcert={other_ca / 'ca.pem'}"
    )
    with pytest.raises(Exception, match="certificate verify failed"):
        await ssl_in_use(unknown)
    wrong_name = pg_settings(
        migrated, "127.0.0.1", f"sslmode=verify-full&sslrootcert={server_ca / 'ca.pem'}"
    )
    with pytest.raises(Exception, match="certificate verify failed"):
        await ssl_in_use(wrong_name)
    # verify-ca checks the chain only: the same name is accepted
    chain_only = pg_settings(
        migrated, "127.0.0.1", f"sslmode=verify-ca&sslrootcert={server_ca / 'ca.pem'}"
    )
    assert await ssl_in_use(chain_only)


def test_sslmode_is_validated() -> None:
    with pytest.raises(ValueError, match="sslmode"):
        db_mod.tls_context({"sslmode": "verify-everything"})
    assert db_mod.tls_context({}) is None
    assert db_mod.tls_context({"sslmode": "disable"}) is False
