"""``/metrics``: Prometheus text exposition of this worker's registry."""

from __future__ import annotations

from sanic import Blueprint, HTTPResponse
from sanic_ext import openapi

from api.context import Req
from api.metrics import CONTENT_TYPE

bp = Blueprint("metrics")


@bp.get("/metrics", name="metrics")
@openapi.summary("Prometheus metrics of the worker that answers")
async def metrics(request: Req) -> HTTPResponse:
    return HTTPResponse(request.app.ctx.metrics.render(), content_type=CONTENT_TYPE)
