"""Probes: liveness (the process answers) and readiness (PostgreSQL and Redis answer)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Final

from sanic import Blueprint, HTTPResponse
from sanic.response import json
from sanic_ext import openapi

from api.context import Req
from storage import db

bp = Blueprint("health", url_prefix="/health")
TIMEOUT_S: Final = 2.0


async def _bounded(check: Coroutine[Any, Any, bool]) -> bool:
    try:
        return await asyncio.wait_for(check, TIMEOUT_S)
    except Exception:
        return False


@bp.get("/live", name="live")
@openapi.summary("Liveness probe")
async def live(request: Req) -> HTTPResponse:
    return json({"status": "ok"})


@bp.get("/ready", name="ready")
@openapi.summary("Readiness probe: 503 names the dependency that is down")
async def ready(request: Req) -> HTTPResponse:
    postgres, redis = await asyncio.gather(
        _bounded(db.ping()),
        _bounded(request.app.ctx.cache.ping()),
    )
    checks = {"postgres": "ok" if postgres else "down", "redis": "ok" if redis else "down"}
    down = [name for name, state in checks.items() if state != "ok"]
    if down:
        return json({"status": "unavailable", "checks": checks, "down": down}, status=503)
    return json({"status": "ok", "checks": checks})
