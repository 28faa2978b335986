"""PostgreSQL through Tortoise: one config for the app, workers, tests and migrations."""

from __future__ import annotations

import contextlib
import ssl
import sys
from collections.abc import AsyncIterator
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import asyncpg
from tortoise import Tortoise, connections
from tortoise import context as tortoise_context
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.connection import get_connections
from tortoise.exceptions import DBConnectionError, OperationalError
from tortoise.transactions import in_transaction

from sessiond.config import Settings, get_settings

DB_CONNECTION_ERRORS: Final = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up, admin shutdown
    # A connection lost mid-operation while the server shuts down leaves asyncpg's protocol in a
    # state it refuses to leave ("cannot switch to state 12"): the model checker saw it as a 500.
    asyncpg.exceptions.InternalClientError,
    DBConnectionError,
)
"""What PostgreSQL calls raise, besides ``OSError``, when the server is down or restarting: the
one list the API's outage answers (503, gRPC UNAVAILABLE) are built from."""

DB_WRAPPED_ERROR: Final = OperationalError
"""What Tortoise wraps any driver error in, a lost connection as well as a failing statement:
the cause (``__cause__``) tells them apart."""

APP = "models"


# libpq's TLS parameters, read from the URL query like ``psql`` would (Tortoise passes unknown
# query parameters to asyncpg as keyword arguments, which asyncpg would refuse).
TLS_PARAMS = ("sslmode", "sslrootcert", "sslcert", "sslkey")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def tls_context(query: dict[str, str]) -> ssl.SSLContext | bool | None:
    """``sslmode`` as libpq means it: ``verify-full`` checks the chain against ``sslrootcert`` (or
    the system store) and the host name; ``verify-ca`` the chain only; ``require`` encrypts
    without checking who answers. ``None``: asyncpg's default (``prefer``)."""
    mode = query.get("sslmode")
    if mode is None or mode in ("allow", "prefer"):
        return None
    if mode not in SSL_MODES:
        raise ValueError(f"sslmode must be one of {', '.join(SSL_MODES)}")
    if mode == "disable":
        return False
    if mode == "require" and not query.get("sslrootcert"):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=query.get("sslrootcert"))
        ctx.check_hostname = mode == "verify-full"
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if query.get("sslcert"):
        ctx.load_cert_chain(query["sslcert"], query.get("sslkey"))
    return ctx


def hosts(netloc: str) -> tuple[list[str], list[int]]:
    """The ``host:port`` list of a (possibly multi-host) URL's netloc, libpq's syntax:
    ``h1:5432,h2:5433``, ``[::1]:5432``, a port defaulting to 5432."""
    spec = netloc.rsplit("@", 1)[-1]
    names: list[str] = []
    ports: list[int] = []
    for item in spec.split(","):
        host, _, port = item.rpartition(":") if not item.endswith("]") else (item, "", "")
        if not host:  # no port given
            host, port = item, ""
        names.append(unquote(host.strip("[]")) or "127.0.0.1")
        ports.append(int(port) if port else 5432)
    return names, ports


def _connection(settings: Settings) -> str | dict[str, Any]:
    """Pool bounds travel in the URL query because that is where Tortoise reads them; with TLS
    parameters or several hosts (a primary and its standbys: ``storage.pg_engine``), a
    credentials dict instead."""
    parts = urlsplit(settings.database_url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("minsize", str(settings.db_pool_min))
    query.setdefault("maxsize", str(settings.db_pool_max))
    tls = {k: query.pop(k) for k in TLS_PARAMS if k in query}
    multi = "," in parts.netloc.rsplit("@", 1)[-1]
    if not tls and not multi:
        return urlunsplit(
            (parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment)
        )
    names, ports = hosts(parts.netloc)
    credentials: dict[str, Any] = {
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "database": unquote(parts.path[1:]),
        **query,
    }
    if multi:
        credentials.update(hosts=names, ports=ports)
    else:
        credentials.update(host=names[0], port=ports[0])
    credentials["minsize"] = int(credentials["minsize"])
    credentials["maxsize"] = int(credentials["maxsize"])
    ssl_arg = tls_context(tls)
    if ssl_arg is not None:
        credentials["ssl"] = ssl_arg
    engine = "storage.pg_engine" if multi else "tortoise.backends.asyncpg"
    return {"engine": engine, "credentials": credentials}


def tortoise_config(settings: Settings) -> dict[str, Any]:
    """The one config of the app, the workers, the tests and the migrations."""
    return {
        "connections": {"default": _connection(settings)},
        "apps": {
            APP: {
                "models": ["storage.models"],
                "default_connection": "default",
                "migrations": "storage.migrations",
            }
        },
        "use_tz": True,
        "timezone": "UTC",
    }


def __getattr__(name: str) -> Any:
    """``TORTOISE_ORM`` for the ``tortoise`` CLI (``tortoise -c storage.db.TORTOISE_ORM ...``)."""
    if name == "TORTOISE_ORM":
        return tortoise_config(get_settings())
    raise AttributeError(name)


async def open_db(settings: Settings) -> None:
    """Global fallback context: the ORM is used from many tasks (Sanic requests, actor calls run
    on Dramatiq's loop thread), not only from the task that initialised it."""
    await Tortoise.init(config=tortoise_config(settings), _enable_global_fallback=True)


async def close_db() -> None:
    if tortoise_context.get_current_context() is None:
        return
    await connections.close_all(discard=True)
    # Tortoise offers no public way to drop the global fallback; without this, the next
    # ``open_db`` in the same process (tests, CLI) would be refused.
    tortoise_context._global_context = None


def conn() -> BaseDBAsyncClient:
    client: BaseDBAsyncClient = connections.get("default")
    return client


async def migrate(settings: Settings) -> None:
    """Applies pending migrations; safe to run from several replicas one after the other."""
    from tortoise.migrations.api.migrate import migrate as run_migrations

    try:
        await run_migrations(config=tortoise_config(settings))
    finally:
        await close_db()


async def ping() -> bool:
    try:
        await conn().execute_query("SELECT 1")
    except Exception:
        return False
    return True


@contextlib.asynccontextmanager
async def transaction() -> AsyncIterator[BaseDBAsyncClient]:
    """Tortoise's ``in_transaction``, without its leak when PostgreSQL goes away.

    Tortoise makes the transaction the task's current connection *before* ``BEGIN`` and undoes it
    only in ``__aexit__`` (after the release). A ``BEGIN`` on a pooled connection the server has
    just terminated (a restart, a failover) raises in ``__aenter__``, so nothing undoes it: the
    task keeps a dead transaction as its connection, and every later statement of that task fails
    with ``InterfaceError: ... released back to the pool``. Short tasks (a request, an actor call)
    end and take it with them; a long-lived loop (the outbox relay) never published again. Here
    the task's connection is restored whatever fails, and the pooled connection given back."""
    context: Any = in_transaction()
    try:
        client = await context.__aenter__()
    except BaseException:
        await _undo(context)
        raise
    try:
        yield client
    except BaseException:
        try:
            await context.__aexit__(*sys.exc_info())
        finally:
            await _undo(context)
        raise
    try:
        await context.__aexit__(None, None, None)
    finally:
        await _undo(context)


async def _undo(context: Any) -> None:
    token = getattr(context, "token", None)
    if token is None or getattr(token, "_used", True):
        return  # never set, or ``__aexit__`` restored it
    get_connections().reset(token)
    client = getattr(context, "client", None)
    pool = getattr(getattr(client, "_parent", None), "_pool", None)
    proxy = getattr(client, "_connection", None)
    if pool is not None and proxy is not None:
        with contextlib.suppress(Exception):  # a dead connection: asyncpg discards it
            await pool.release(proxy, timeout=2.0)
