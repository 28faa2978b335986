"""``/metrics``: Prometheus text exposition, summed over the API's Sanic workers."""

from __future__ import annotations

from sanic import Blueprint, HTTPResponse
from sanic_ext import openapi

from api.context import Req
from api.metrics import CONTENT_TYPE

bp = Blueprint("metrics")


@bp.get("/metrics", name="metrics")
@openapi.summary("Prometheus metrics of this API process (all its workers)")
async def metrics(request: Req) -> HTTPResponse:
    ctx = request.app.ctx
    body = ctx.shared_metrics.render() if ctx.shared_metrics else ctx.metrics.render()
    return HTTPResponse(body, content_type=CONTENT_TYPE)
