"""``POST /oauth2/introspect``: OAuth 2.0 Token Introspection (RFC 7662), for gateways and
resource servers that already speak it (Kong, Apigee, Spring Security's opaque-token support...).

The caller authenticates first (§2.1): HTTP Basic with a client of
``SESSIOND_INTROSPECTION_CLIENTS`` (id and secret form-urlencoded first, RFC 6749 §2.3.1; every
configured secret is compared in constant time), or a bearer token whose ``roles`` hold
``introspect``. Anything else is 401 with a ``WWW-Authenticate`` challenge.

The token of form field ``token`` then goes through ``api.decision.decide``, the decision of
``/auth/check`` (signature, user and session open, idle, lifetime, fence). Granted: the RFC 7662
§2.2 members it has. Anything else: exactly ``{"active": false}``; the reason goes only to the
journal and the metrics (route ``/oauth2/introspect``), never to the caller. A dependency outage
is 503, as everywhere: "don't know" is not "inactive". ``token_type_hint`` is accepted and
ignored (only access tokens exist here). Every answer carries ``Cache-Control: no-store``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from time import perf_counter
from typing import Any, Final
from urllib.parse import unquote_plus

from sanic import Blueprint, HTTPResponse
from sanic.response import json
from sanic_ext import openapi

from api.access import Denied
from api.context import Req
from api.decision import Decision, decide
from api.tokens import TokenError

bp = Blueprint("introspect")
ROUTE: Final = "/oauth2/introspect"
ROLE: Final = "introspect"
INACTIVE: Final = {"active": False}
NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}
BASIC_CHALLENGE: Final = 'Basic realm="sessiond"'
_CLAIMS: Final = ("exp", "iat", "nbf", "iss", "aud", "jti")


def basic_client(value: str, clients: dict[str, str]) -> bool:
    """Whether ``Basic <value>`` names a configured client with its secret. Every configured
    client is compared, each in constant time, so the time taken tells nothing of which one (or
    whether an id) matched."""
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        return False
    given_id, given_secret = unquote_plus(client_id).encode(), unquote_plus(secret).encode()
    found = False
    for known_id, known_secret in clients.items():
        same_id = hmac.compare_digest(known_id.encode(), given_id)
        same_secret = hmac.compare_digest(known_secret.encode(), given_secret)
        found |= same_id and same_secret
    return found


def _refuse_caller(reason: str, bearer: str | None = None) -> HTTPResponse:
    challenge = BASIC_CHALLENGE if bearer is None else f"{BASIC_CHALLENGE}, {bearer}"
    body = {"error": "invalid_client", "reason": reason}
    return json(body, status=401, headers={**NO_STORE, "WWW-Authenticate": challenge})


async def _caller_refused(request: Req) -> HTTPResponse | None:
    """``None`` when the caller may introspect, else its 401."""
    ctx = request.app.ctx
    header = request.headers.get("authorization")
    scheme, _, rest = (header or "").partition(" ")
    if scheme.lower() == "bearer":
        try:
            await ctx.access.authorize_role(header, ROUTE, ROLE)
        except TokenError as exc:
            return _refuse_caller(exc.reason, 'Bearer error="invalid_token"')
        except Denied as exc:
            return _refuse_caller(exc.reason, 'Bearer error="insufficient_scope"')
        return None
    reason = "missing" if header is None else "bad_credentials"
    if scheme.lower() == "basic" and basic_client(rest, ctx.settings.introspection_credentials):
        return None
    ctx.metrics.decisions.inc(ROUTE, "invalid_client", reason)
    ctx.recorder.record(ctx.clock(), None, None, "invalid_client", reason, ROUTE)
    return _refuse_caller(reason)


def active_members(decision: Decision) -> dict[str, Any]:
    """RFC 7662 §2.2 members of a granted token, those it has."""
    assert decision.grant is not None
    principal = decision.grant.principal
    claims = principal.claims
    body: dict[str, Any] = {"active": True, "sub": principal.user_id, "token_type": "Bearer"}
    if principal.session_id is not None:
        body["sid"] = principal.session_id
    for name in _CLAIMS:
        if claims.get(name) is not None:
            body[name] = claims[name]
    scope = claims.get("scope", claims.get("scp"))
    if isinstance(scope, list):
        scope = " ".join(s for s in scope if isinstance(s, str))
    if isinstance(scope, str) and scope:
        body["scope"] = scope
    client_id = claims.get("client_id", claims.get("azp"))
    if isinstance(client_id, str) and client_id:
        body["client_id"] = client_id
    username = claims.get("preferred_username") or decision.grant.user.get("name")
    if isinstance(username, str) and username:
        body["username"] = username
    return body


@openapi.summary("Token introspection (RFC 7662)")
@openapi.description(
    "Caller: HTTP Basic (SESSIOND_INTROSPECTION_CLIENTS) or a bearer token with role "
    "`introspect`, else 401. Form field `token`: the active token's RFC 7662 members, or "
    'exactly `{"active": false}`.'
)
@openapi.body(
    {
        "application/x-www-form-urlencoded": {
            "type": "object",
            "properties": {"token": {"type": "string"}, "token_type_hint": {"type": "string"}},
            "required": ["token"],
        }
    }
)
@openapi.secured("bearer")
async def introspect(request: Req) -> HTTPResponse:
    ctx = request.app.ctx
    started = perf_counter()
    refused = await _caller_refused(request)
    if refused is not None:
        return refused
    tokens = request.form.getlist("token") if request.form else []
    if len(tokens) != 1 or not tokens[0]:
        body = {"error": "invalid_request", "reason": "token"}
        return json(body, status=400, headers=NO_STORE)
    decision = await decide(ctx.access, f"Bearer {tokens[0]}", ROUTE)
    answer = active_members(decision) if decision.status == 200 else INACTIVE
    ctx.metrics.latency.observe(perf_counter() - started, ROUTE)
    return json(answer, headers=NO_STORE)


bp.add_route(introspect, ROUTE, methods=("POST",), name="introspect")
