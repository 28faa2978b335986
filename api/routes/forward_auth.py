"""``/auth/check``: forward-auth for nginx ``auth_request``, Traefik ForwardAuth, Caddy
``forward_auth`` and Envoy's HTTP ext_authz (its gRPC flavour is ``api.grpc_authz``).

200 with an empty body and the caller's identity in all three headers (empty when unknown), or
the 401/403 JSON of CONTRACT §2. Envoy's HTTP ext_authz appends the original path and keeps the
original method, so both the bare path and ``/auth/check/<anything>`` answer every common method.
"""

from __future__ import annotations

from time import perf_counter
from typing import Final

from sanic import Blueprint, HTTPResponse
from sanic_ext import openapi

from api.context import Req
from api.decision import decide, header_value
from api.errors import forbidden, invalid_token

__all__ = ["ROUTE", "bp", "header_value"]

bp = Blueprint("forward_auth")
ROUTE: Final = "/auth/check"
METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
TEXT: Final = "text/plain; charset=utf-8"


@openapi.summary("Forward-auth decision")
@openapi.description(
    "200 with X-User-Id, X-User-Email, X-Session-Id (always all three, empty when unknown; "
    "percent-encoded, `%` included); 401 invalid_token; 403 forbidden."
)
@openapi.secured("bearer")
async def check(request: Req, rest: str = "") -> HTTPResponse:
    ctx = request.app.ctx
    started = perf_counter()
    decision = await decide(ctx.access, request.headers.get("authorization"), ROUTE)
    if decision.status == 200:
        response = HTTPResponse(status=200, headers=dict(decision.identity()), content_type=TEXT)
    elif decision.status == 401:
        response = invalid_token(decision.reason or "")
    else:
        response = forbidden(decision.reason or "")
    ctx.metrics.latency.observe(perf_counter() - started, ROUTE)
    return response


bp.add_route(check, ROUTE, methods=METHODS, name="check")
bp.add_route(check, f"{ROUTE}/<rest:path>", methods=METHODS, name="check_path")
