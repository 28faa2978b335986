"""``/auth/check``: forward-auth for nginx ``auth_request``, Traefik ForwardAuth, Envoy ext_authz.

200 with an empty body and the caller's identity in headers, or the 401/403 JSON of CONTRACT §2.
Envoy's HTTP ext_authz appends the original path and keeps the original method, so both the bare
path and ``/auth/check/<anything>`` answer every common method.
"""

from __future__ import annotations

from time import perf_counter
from typing import Final
from urllib.parse import quote

from sanic import Blueprint, HTTPResponse
from sanic_ext import openapi

from api.access import Denied
from api.context import Req
from api.errors import forbidden, invalid_token
from api.tokens import TokenError

bp = Blueprint("forward_auth")
ROUTE: Final = "/auth/check"
METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
TEXT: Final = "text/plain; charset=utf-8"
_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%") + " "


def header_value(value: str) -> str:
    """Printable ASCII as is; anything else (non-ASCII e-mail, CR/LF) percent-encoded."""
    if value.isascii() and value.isprintable():
        return value
    return quote(value, safe=_SAFE)


@openapi.summary("Forward-auth decision")
@openapi.description(
    "200 with X-User-Id, X-User-Email, X-Session-Id; 401 invalid_token; 403 forbidden."
)
@openapi.secured("bearer")
async def check(request: Req, rest: str = "") -> HTTPResponse:
    ctx = request.app.ctx
    started = perf_counter()
    try:
        grant = await ctx.access.authorize(request.headers.get("authorization"), ROUTE)
    except TokenError as exc:
        response = invalid_token(exc.reason)
    except Denied as exc:
        response = forbidden(exc.reason)
    else:
        principal = grant.principal
        headers = {"X-User-Id": header_value(principal.user_id)}
        email = grant.user.get("email")
        if email:
            headers["X-User-Email"] = header_value(email)
        if principal.session_id is not None:
            headers["X-Session-Id"] = header_value(principal.session_id)
        response = HTTPResponse(status=200, headers=headers, content_type=TEXT)
    ctx.metrics.latency.observe(perf_counter() - started, ROUTE)
    return response


bp.add_route(check, ROUTE, methods=METHODS, name="check")
bp.add_route(check, f"{ROUTE}/<rest:path>", methods=METHODS, name="check_path")
