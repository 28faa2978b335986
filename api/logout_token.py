"""OIDC Back-Channel Logout 1.0 logout tokens, validated as its §2.6 says (CONTRACT §8).

1. a JWT signed with a key of the configured JWKS, with an asymmetric algorithm only: ``none``
   and every HMAC algorithm are refused, whatever ``SESSIOND_JWT_ALGORITHMS`` allows for bearer
   tokens (a shared secret would let any relying party forge logouts for all the others);
2. ``iss`` is ``SESSIOND_BACKCHANNEL_ISSUER`` (default ``SESSIOND_JWT_ISSUER``), ``aud``
   contains one of ``SESSIOND_BACKCHANNEL_AUDIENCE``, ``iat`` is within ``SESSIOND_JWT_LEEWAY_S``
   of now (neither stale nor from the future), ``exp`` (when present) not past;
3. ``events`` is an object with the member ``http://schemas.openid.net/event/backchannel-logout``
   whose value is an object;
4. ``sub`` or ``sid`` (or both) present, as non-empty strings;
5. no ``nonce`` (so that an ID token can never be replayed as a logout token);
6. ``jti`` present: single use is enforced by the route, in Redis, for the token's lifetime.

Every refusal is a ``LogoutTokenError`` with a reason for logs and metrics; the client only ever
sees ``400 {"error": "invalid_request"}`` (§2.8).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import jwt

from api.tokens import ASYMMETRIC_ALGORITHMS, KeySet, TokenError, _no_duplicate_members
from sessiond.config import Settings
from sessiond.errors import SessiondError

EVENT: Final = "http://schemas.openid.net/event/backchannel-logout"
MAX_ID: Final = 128
MAX_JTI: Final = 256


class LogoutTokenError(SessiondError):
    """An invalid logout token; ``reason`` names the failed check (never sent to the client)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LogoutRequest:
    """What a valid logout token asks: ``sid`` ends that session, ``sub`` alone all of them."""

    issuer: str
    jti: str
    subject: str | None
    session_id: str | None
    expires_at: float


def _text(claims: dict[str, Any], name: str, limit: int) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > limit or "\x00" in value:
        raise LogoutTokenError(f"bad_{name}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise LogoutTokenError(f"bad_{name}") from None
    return value


class LogoutTokenValidator:
    """Validates ``logout_token`` form values; built once per API process."""

    def __init__(
        self, settings: Settings, keys: KeySet | None, *, now: Callable[[], float] = time.time
    ) -> None:
        self.audiences = frozenset(settings.backchannel_audiences)
        self.issuer = settings.backchannel_issuer or settings.jwt_issuer
        self.keys = keys
        self.leeway = float(settings.jwt_leeway_s)
        self.max_bytes = settings.jwt_max_bytes
        self.now = now

    @property
    def enabled(self) -> bool:
        return bool(self.audiences)

    def check_configuration(self) -> None:
        """Refuses to start a back-channel endpoint that could not verify anything."""
        if self.enabled and (self.keys is None or not self.issuer):
            raise ValueError(
                "SESSIOND_BACKCHANNEL_AUDIENCE needs a JWKS (SESSIOND_JWKS_FILE or _URL) and an"
                " issuer (SESSIOND_BACKCHANNEL_ISSUER or SESSIOND_JWT_ISSUER)"
            )

    async def validate(self, token: str | None) -> LogoutRequest:
        if not token or len(token) > self.max_bytes or not token.isascii():
            raise LogoutTokenError("malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise LogoutTokenError("malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
            raise LogoutTokenError("bad_algorithm")
        if self.keys is None or self.issuer is None:
            raise LogoutTokenError("not_configured")
        kid = header.get("kid")
        try:
            jwk, declared = await self.keys.get(kid if isinstance(kid, str) else None)
        except TokenError:
            raise LogoutTokenError("unknown_key") from None
        if declared is not None and declared != alg:
            raise LogoutTokenError("bad_algorithm")
        claims = self._decode(token, jwk.key, alg)
        return self._request(claims)

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options={"require": ["iat", "jti"], "verify_aud": False, "verify_iat": False},
                leeway=self.leeway,
                issuer=self.issuer,
            )
        except jwt.ExpiredSignatureError:
            raise LogoutTokenError("expired") from None
        except jwt.InvalidSignatureError:
            raise LogoutTokenError("bad_signature") from None
        except (jwt.InvalidIssuerError, jwt.MissingRequiredClaimError) as exc:
            claim = getattr(exc, "claim", "iss")
            raise LogoutTokenError(f"bad_{claim}" if claim else "bad_iss") from None
        except jwt.PyJWTError:
            raise LogoutTokenError("malformed") from None
        except (TypeError, ValueError):  # a key that cannot verify this algorithm
            raise LogoutTokenError("bad_algorithm") from None
        if not _no_duplicate_members(token):
            raise LogoutTokenError("malformed")
        return claims

    def _request(self, claims: dict[str, Any]) -> LogoutRequest:
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(a, str) and a in self.audiences for a in auds):
            raise LogoutTokenError("bad_aud")
        iat = claims.get("iat")
        if isinstance(iat, bool) or not isinstance(iat, int | float):
            raise LogoutTokenError("bad_iat")
        now = self.now()
        if abs(now - float(iat)) > self.leeway:
            raise LogoutTokenError("stale_iat")
        exp = claims.get("exp")
        if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int | float)):
            raise LogoutTokenError("bad_exp")
        events = claims.get("events")
        if not isinstance(events, dict) or not isinstance(events.get(EVENT), dict):
            raise LogoutTokenError("bad_events")
        if "nonce" in claims:
            raise LogoutTokenError("nonce")
        jti = _text(claims, "jti", MAX_JTI)
        subject = _text(claims, "sub", MAX_ID)
        session_id = _text(claims, "sid", MAX_ID)
        if jti is None:
            raise LogoutTokenError("bad_jti")
        if subject is None and session_id is None:
            raise LogoutTokenError("no_subject")
        lifetime_end = max(float(iat) + self.leeway, float(exp) if exp is not None else 0.0)
        assert self.issuer is not None
        return LogoutRequest(
            issuer=self.issuer,
            jti=jti,
            subject=subject,
            session_id=session_id,
            expires_at=lifetime_end + self.leeway,
        )
