"""PostgreSQL through Tortoise: one config for the app, workers, tests and migrations."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tortoise import Tortoise, connections
from tortoise import context as tortoise_context
from tortoise.backends.base.client import BaseDBAsyncClient

from sessiond.config import Settings, get_settings

APP = "models"


def tortoise_config(settings: Settings) -> dict[str, Any]:
    """Pool bounds travel in the URL query because that is where Tortoise reads them."""
    parts = urlsplit(settings.database_url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("minsize", str(settings.db_pool_min))
    query.setdefault("maxsize", str(settings.db_pool_max))
    url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
    return {
        "connections": {"default": url},
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
