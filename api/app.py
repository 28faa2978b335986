"""The Sanic application factory.

Run with ``python -m sanic api.app:create_app --factory --workers N`` (what ``sessiond api``
does): every worker process calls the factory, then opens its own PostgreSQL pool and Redis
client in ``before_server_start`` and closes them in ``after_server_stop``. Nothing connects at
import time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Final

from sanic import HTTPResponse, Request, Sanic
from sanic.config import Config
from sanic_ext import Extend
from sanic_ext.extensions.openapi.extension import OpenAPIExtension

from api import graceful_stop
from api.access import AccessControl, Clock
from api.context import App, AppContext
from api.errors import JsonErrorHandler
from api.grpc_authz import GrpcServer
from api.metrics import Metrics, SharedMetrics
from api.reconciler import Reconciler
from api.recorder import Recorder
from api.routes import BLUEPRINTS
from api.tokens import TokenValidator
from sessiond.config import Settings, get_settings
from sessiond.errors import DependencyUnavailable
from sessiond.logs import setup_logging
from sessiond.stacks import dump_on_sigusr1
from storage import cache as cache_mod
from storage import db, redis_conn
from storage.activity import AccessLog, ActivityBuffer
from storage.redis_policy import check_memory_policy

NAME: Final = "sessiond"


def create_app(settings: Settings | None = None, *, clock: Clock | None = None) -> App:
    """A configured app; ``clock`` (epoch seconds) is injectable for idle-timeout tests.

    Sanic's CLI calls a factory with its parsed arguments when it accepts one: anything that is
    not a ``Settings`` means "from the environment"."""
    if not isinstance(settings, Settings):
        settings = get_settings()
    setup_logging(settings.log_level)
    graceful_stop.install()
    dump_on_sigusr1()
    ctx = AppContext(
        settings=settings,
        clock=clock or time.time,
        tokens=TokenValidator(settings),
        metrics=Metrics(),
    )
    config = Config()
    config.update(
        {
            "FALLBACK_ERROR_FORMAT": "json",
            "ACCESS_LOG": False,
            "MOTD": False,
            "KEEP_ALIVE_TIMEOUT": 75,  # longer than nginx/Envoy upstream keep-alive
            "REQUEST_MAX_SIZE": 1_000_000,
            "REQUEST_MAX_HEADER_SIZE": min(16384, max(8192, settings.jwt_max_bytes + 4096)),
            # sanic-ext: the OpenAPI document only.
            "OAS_UI_DEFAULT": "redoc",
            "OAS_URL_PREFIX": "/docs",
            "OAS_AUTODOC": True,
            "API_TITLE": "sessiond",
            "API_VERSION": "1",
            "API_DESCRIPTION": "Is this user's session alive? (CONTRACT §2)",
        }
    )
    app: App = Sanic(
        NAME,
        config=config,
        ctx=ctx,
        error_handler=JsonErrorHandler(),
        configure_logging=False,
    )
    # Only the OpenAPI extension: the built-in injection one dispatches a signal on every request.
    Extend(app, extensions=[OpenAPIExtension], built_in_extensions=False)
    app.ext.openapi.add_security_scheme("bearer", "http", scheme="bearer", bearer_format="JWT")
    app.blueprint(BLUEPRINTS)  # type: ignore[arg-type]
    # PostgreSQL down (any route: admin, the miss path, readiness) is 503 like Redis down, never
    # a 500: asyncpg's connection errors are not OSErrors.
    for kind in db.DB_CONNECTION_ERRORS:
        app.error_handler.add(kind, _db_unavailable)
    app.error_handler.add(db.DB_WRAPPED_ERROR, _db_operational)
    app.register_listener(_share_metrics, "main_process_start")
    app.register_listener(_unshare_metrics, "main_process_stop")
    app.register_listener(_open, "before_server_start")
    app.register_listener(_close, "after_server_stop")
    return app


_OWN_METRICS_DIR: Final = "SESSIOND_OWN_METRICS_DIR"


def _share_metrics(app: App) -> None:
    """Runs once in Sanic's main process, before it starts the workers (which inherit the
    environment): gives them a directory to add their metrics up in (``SharedMetrics``)."""
    if app.ctx.settings.metrics_dir is None:
        os.environ["SESSIOND_METRICS_DIR"] = tempfile.mkdtemp(prefix="sessiond-metrics-")
        os.environ[_OWN_METRICS_DIR] = "1"
    else:
        for stale in Path(app.ctx.settings.metrics_dir).glob("*.json"):
            stale.unlink(missing_ok=True)  # a previous run's workers


def _unshare_metrics(app: App) -> None:
    directory = os.environ.get("SESSIOND_METRICS_DIR")
    if directory and os.environ.pop(_OWN_METRICS_DIR, None):
        shutil.rmtree(directory, ignore_errors=True)


async def _open(app: App) -> None:
    ctx = app.ctx
    settings = ctx.settings
    await db.open_db(settings)
    ctx.redis = redis_conn.connect(settings)
    if settings.redis_policy_check:
        await check_memory_policy(ctx.redis)
    ctx.cache = cache_mod.Cache(ctx.redis, ttl_s=settings.cache_ttl_s)
    ctx.activity = ActivityBuffer(ctx.redis)
    ctx.recorder = Recorder(
        ctx.redis,
        ctx.activity,
        access_log=AccessLog.configured(ctx.redis, settings),
        overflow=ctx.metrics.overflow,
        max_backlog=settings.api_buffer_max_entries,
        max_bytes=settings.api_buffer_max_bytes,
    )
    ctx.access = AccessControl(
        tokens=ctx.tokens,
        cache=ctx.cache,
        activity=ctx.activity,
        recorder=ctx.recorder,
        metrics=ctx.metrics,
        clock=ctx.clock,
        idle_timeout_s=settings.idle_timeout_s,
        idle_scope=settings.idle_scope,
        session_max_s=settings.session_max_s,
    )
    if ctx.tokens.keys is not None:
        await ctx.tokens.keys.refresh(force=True)
    ctx.recorder.start()
    if settings.metrics_dir is not None:
        ctx.shared_metrics = SharedMetrics(ctx.metrics, Path(settings.metrics_dir))
        ctx.shared_metrics.start()
    ctx.reconciler = Reconciler(
        ctx.cache,
        ctx.metrics,
        period_s=settings.cache_reconcile_s,
        on_unavailable=ctx.access.trust.failed,
    )
    ctx.access.trust.catch_up = ctx.reconciler.catch_up
    ctx.reconciler.start()
    if settings.grpc_port is not None:  # last: its calls need everything above
        ctx.grpc = GrpcServer(ctx, host=settings.api_host, port=settings.grpc_port)
        await ctx.grpc.start()


def _db_unavailable(request: Request, exception: Exception) -> HTTPResponse:
    wrapped = DependencyUnavailable(f"postgres: {type(exception).__name__}")
    return request.app.error_handler.default(request, wrapped)


def _db_operational(request: Request, exception: Exception) -> HTTPResponse:
    """Tortoise wraps every driver error (``db.DB_WRAPPED_ERROR``): only a lost connection (its
    cause) is 503; a failing statement stays a 500, a bug to see."""
    cause = exception.__cause__
    if isinstance(cause, (OSError, TimeoutError, *db.DB_CONNECTION_ERRORS)):
        return _db_unavailable(request, exception)
    return request.app.error_handler.default(request, exception)


async def _close(app: App) -> None:
    ctx = app.ctx
    if ctx.grpc is not None:  # first: its in-flight calls still need Redis and PostgreSQL
        await ctx.grpc.stop()
        ctx.grpc = None
    await ctx.reconciler.stop()
    if ctx.shared_metrics is not None:
        await ctx.shared_metrics.stop()
    await ctx.access.close()
    await ctx.recorder.stop()
    await ctx.cache.close()
    await db.close_db()
