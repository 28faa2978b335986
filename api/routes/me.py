"""``/api/me``: the caller's own profile, for any active user."""

from __future__ import annotations

from time import perf_counter
from typing import Final

from sanic import Blueprint, HTTPResponse
from sanic.response import json
from sanic_ext import openapi

from api.context import Req

bp = Blueprint("me")
ROUTE: Final = "/api/me"


@bp.get(ROUTE, name="me")
@openapi.summary("The caller's profile")
@openapi.secured("bearer")
async def me(request: Req) -> HTTPResponse:
    ctx = request.app.ctx
    started = perf_counter()
    try:
        grant = await ctx.access.authorize(request.headers.get("authorization"), ROUTE)
        user = grant.user
        body = {
            "user_id": grant.principal.user_id,
            "name": user.get("name"),
            "email": user.get("email"),
            "status": user.get("status"),
            "last_activity_at": await ctx.access.last_activity(grant),
        }
    finally:
        ctx.metrics.latency.observe(perf_counter() - started, ROUTE)
    return json(body)
