"""The one forward-auth decision, whatever the protocol: ``/auth/check`` (HTTP), Envoy's
``Authorization/Check`` (gRPC) and ``/oauth2/introspect`` (RFC 7662) all call ``decide`` and only
differ in how they write its ``Decision`` down. So a 200 here is a 200 there, a 403 reason here
is the same reason there, and a dependency outage is an outage everywhere (503 / UNAVAILABLE),
never a refusal or a grant.

Identity headers (CONTRACT §9): ``X-User-Id``, ``X-User-Email``, ``X-Session-Id`` are always all
three on a grant, empty when unknown, so that a proxy configured to copy them always overwrites
whatever the client sent. Their values are encoded injectively: see ``header_value``.
"""

from __future__ import annotations

import json
from typing import Final
from urllib.parse import quote

from api.access import AccessControl, Denied, Grant
from api.tokens import TokenError
from sessiond.errors import DependencyUnavailable
from storage.redis_conn import REDIS_CONNECTION_ERRORS

IDENTITY_HEADERS: Final = ("X-User-Id", "X-User-Email", "X-Session-Id")
WWW_AUTHENTICATE_BEARER: Final = 'Bearer error="invalid_token"'
UNAVAILABLE: Final = (*REDIS_CONNECTION_ERRORS, DependencyUnavailable, OSError)
"""What ``decide`` raises when a dependency is down: 503 over HTTP, UNAVAILABLE over gRPC."""

# Visible ASCII but "%" stays as is; everything else (space, "%", controls, non-ASCII) is
# percent-encoded from its UTF-8 bytes.
_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")
_VISIBLE: Final = frozenset(_SAFE)


def header_value(value: str) -> str:
    """The identity as a header value: RFC 3986 percent-encoding of its UTF-8 bytes, applied to
    every character outside visible ASCII (0x21-0x7E) and to ``%`` itself. ``%`` is always
    encoded, so decoding (``urllib.parse.unquote``, JavaScript's ``decodeURIComponent``) gives
    back exactly the original: user ``café`` is ``caf%C3%A9`` and user ``caf%C3%A9`` is
    ``caf%25C3%25A9``. Spaces are encoded too, since proxies strip them at either end."""
    if _VISIBLE.issuperset(value):
        return value
    return quote(value, safe=_SAFE)


class Decision:
    """What the decision said: ``status`` 200 (``grant`` set), 401 or 403 (``reason`` set)."""

    __slots__ = ("grant", "reason", "status")

    def __init__(self, status: int, *, reason: str | None = None, grant: Grant | None = None):
        self.status = status
        self.reason = reason
        self.grant = grant

    def identity(self) -> tuple[tuple[str, str], ...]:
        """The three identity headers of a grant, encoded, empty when unknown."""
        assert self.grant is not None
        principal = self.grant.principal
        email = self.grant.user.get("email")
        return (
            ("X-User-Id", header_value(principal.user_id)),
            ("X-User-Email", header_value(email) if isinstance(email, str) else ""),
            ("X-Session-Id", header_value(principal.session_id or "")),
        )

    def body(self) -> bytes:
        """The JSON body of a refusal, byte for byte what ``/auth/check`` answers."""
        error = "invalid_token" if self.status == 401 else "forbidden"
        return json.dumps({"error": error, "reason": self.reason}, separators=(",", ":")).encode()


async def decide(access: AccessControl, authorization: str | None, route: str) -> Decision:
    """The decision for an ``Authorization`` header value, counted and journaled under ``route``.
    Raises one of ``UNAVAILABLE`` when it cannot be made."""
    try:
        grant = await access.authorize(authorization, route)
    except TokenError as exc:
        return Decision(401, reason=exc.reason)
    except Denied as exc:
        return Decision(403, reason=exc.reason)
    return Decision(200, grant=grant)
