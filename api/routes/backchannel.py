"""``POST /oidc/backchannel-logout``: OpenID Connect Back-Channel Logout 1.0 (CONTRACT §8).

An identity provider without a RabbitMQ plugin (Entra ID, Okta, Auth0, Authentik, Zitadel,
Keycloak itself) POSTs a signed ``logout_token`` (form field) when a session ends there. After
``api.logout_token`` validated it (§2.6), its ``jti`` is claimed in Redis (single use), then:
- ``sid`` (with or without ``sub``) ends that session (``revoke_session``); without ``sub`` the
  session's owner is looked up, as ``DELETE /admin/sessions/<id>`` does;
- ``sub`` alone ends every session of the user (``force_disconnect``) and so sets the user's
  token fence;
both with reason ``backchannel_logout``, through the one state machine and the outbox. The answer
is 200 only after the commit (the cache update goes the admin routes' way: ``Reconciler.publish``
heals it when Redis fails); a failure before the commit releases the ``jti`` so that the
provider's retry is accepted. Any invalid token: 400 ``{"error": "invalid_request"}``. Always
``Cache-Control: no-store`` (§2.8). 404 while ``SESSIOND_BACKCHANNEL_AUDIENCE`` is unset.

Metric ``sessiond_backchannel_logout_total{result}``: ``ok`` or the reason of the refusal.
"""

from __future__ import annotations

import logging
from typing import Final

from sanic import Blueprint, HTTPResponse
from sanic.response import empty, json
from sanic_ext import openapi

from api.context import Req
from api.logout_token import LogoutRequest, LogoutTokenError
from storage import revocation
from storage.state import Outcome, find_session_owners, force_disconnect, revoke_session

log = logging.getLogger(__name__)

bp = Blueprint("backchannel", url_prefix="/oidc")
NO_STORE: Final = {"Cache-Control": "no-store"}
REASON: Final = "backchannel_logout"
SOURCE: Final = "backchannel"
FORM_FIELD: Final = "logout_token"


def _invalid(request: Req, reason: str) -> HTTPResponse:
    request.app.ctx.metrics.backchannel.inc(reason)
    log.info("logout token refused", extra={"reason": reason})
    return json({"error": "invalid_request"}, status=400, headers=NO_STORE)


def _form_token(request: Req) -> str | None:
    """The one ``logout_token`` of a form-encoded body; anything else is no token."""
    if not (request.content_type or "").startswith("application/x-www-form-urlencoded"):
        return None
    values = request.form.getlist(FORM_FIELD) if request.form else None
    if not values or len(values) != 1:
        return None
    return str(values[0])


async def _apply(logout: LogoutRequest) -> list[Outcome]:
    if logout.session_id is None:
        assert logout.subject is not None
        return [await force_disconnect(logout.subject, reason=REASON, source=SOURCE)]
    owners = await find_session_owners(logout.session_id)
    if logout.subject is not None:
        owners = [o for o in owners if o == logout.subject]
    return [
        await revoke_session(owner, logout.session_id, reason=REASON, source=SOURCE)
        for owner in owners
    ]


@bp.post("/backchannel-logout", name="backchannel_logout")
@openapi.summary("OIDC Back-Channel Logout: end the session (sid) or user (sub) of a logout token")
@openapi.body(
    {"application/x-www-form-urlencoded": {"type": "object", "properties": {
        FORM_FIELD: {"type": "string"}}, "required": [FORM_FIELD]}},
    required=True,
)  # fmt: skip
@openapi.response(200, description="logged out (committed)")
@openapi.response(400, {"application/json": {"error": str}}, "invalid logout token")
@openapi.response(404, description="back-channel logout is not enabled")
async def backchannel_logout(request: Req) -> HTTPResponse:
    ctx = request.app.ctx
    validator = ctx.logout_tokens
    if not validator.enabled:
        return json({"error": "not_found"}, status=404, headers=NO_STORE)
    try:
        logout = await validator.validate(_form_token(request))
    except LogoutTokenError as exc:
        return _invalid(request, exc.reason)
    ttl = logout.expires_at - ctx.clock()
    if not await revocation.claim_jti(ctx.redis, logout.issuer, logout.jti, ttl):
        return _invalid(request, "replayed_jti")
    try:
        outcomes = await _apply(logout)
    except BaseException:
        await revocation.release_jti(ctx.redis, logout.issuer, logout.jti)
        raise
    for outcome in outcomes:  # committed: a Redis failure now is the reconciler's to heal
        await ctx.reconciler.publish(outcome)
    ctx.metrics.backchannel.inc("ok")
    log.info(
        "back-channel logout",
        extra={
            "sub": logout.subject,
            "sid": logout.session_id,
            "ended": sum(len(o.ended_sessions) for o in outcomes),
        },
    )
    return empty(status=200, headers=NO_STORE)
