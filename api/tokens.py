"""Bearer token validation (CONTRACT §2) with PyJWT.

The accepted algorithms come from configuration only, never from the token: an HMAC algorithm is
verified with ``SESSIOND_JWT_SECRET``, an RSA/EC one with a key of the configured JWKS picked by
``kid``, so a token can never make us verify it with the wrong kind of key (the classic "HS256
signed with the RS public key" confusion is refused as ``bad_algorithm``).

Every refusal is a ``TokenError`` whose ``reason`` is one of the stable codes of ``REASONS``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import jwt
from jwt import PyJWK
from jwt.exceptions import InvalidSubjectError
from jwt.utils import base64url_decode

from sessiond.config import Settings
from sessiond.errors import SessiondError

log = logging.getLogger(__name__)

REASONS: Final = frozenset(
    {
        "missing",
        "malformed",
        "bad_scheme",
        "too_large",
        "expired",
        "not_yet_valid",
        "bad_signature",
        "bad_algorithm",
        "bad_issuer",
        "bad_audience",
        "missing_subject",
        "unknown_key",
        "revoked",
    }
)

HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
MAX_SUBJECT: Final = 128

# Verified tokens are remembered for a short while so that a client sending the same token on
# every request pays for the signature once. Keyed by the whole token, bounded in count and age.
CLAIMS_CACHE_SIZE: Final = 4096
CLAIMS_CACHE_MAX_TOKEN: Final = 2048
CLAIMS_CACHE_MAX_AGE_S: Final = 60.0


def predates_fence(claims: dict[str, Any], fence: float | None, leeway: float) -> bool:
    """The token fence (CONTRACT §8): True when the user logged out everywhere after this token
    was issued, beyond the leeway, so it stays refused (401 ``revoked``) even once the user is
    connected again. A token without a numeric ``iat`` cannot show it was issued after the
    logout: refused too, but only for a user who has a fence (anyone else's tokens need none)."""
    if fence is None:
        return False
    iat = claims.get("iat")
    if isinstance(iat, bool) or not isinstance(iat, int | float):
        return True
    return float(iat) < fence - leeway


class TokenError(SessiondError):
    """A missing or invalid bearer token; ``reason`` is a stable code (401 body)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _storable(text: str) -> bool:
    """Text that PostgreSQL, Redis and HTTP headers can carry: no NUL, no lone surrogate (JSON's
    ``"\\ud800"`` decodes to one, and UTF-8 cannot encode it)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate member name")
    return dict(pairs)


def _no_duplicate_members(token: str) -> bool:
    """RFC 7515 §5.2 / RFC 7519 §4 allow "last one wins" or refusal; we refuse, so that no proxy
    in front of us can read another ``sub`` or ``alg`` from the same token than we do."""
    try:
        for segment in token.split(".")[:2]:
            json.loads(base64url_decode(segment), object_pairs_hook=_unique_keys)
    except ValueError:
        return False
    return True


def _numeric_times(claims: dict[str, Any]) -> bool:
    """RFC 7519 NumericDate is a JSON number; PyJWT also takes ``"1700000000"``. We do not."""
    return all(
        isinstance(claims[name], int | float) and not isinstance(claims[name], bool)
        for name in ("exp", "nbf", "iat")
        if name in claims
    )


class Principal:
    """The caller a valid token names: user id (``sub``, else ``user_id``), session id, roles."""

    __slots__ = ("claims", "roles", "session_id", "user_id")

    def __init__(self, claims: dict[str, Any]) -> None:
        self.claims = claims
        subject = claims.get("sub")
        if subject is None or subject == "":
            subject = claims.get("user_id")
        if isinstance(subject, bool) or not isinstance(subject, str | int):
            raise TokenError("missing_subject")
        user_id = str(subject)
        if not user_id.strip() or len(user_id) > MAX_SUBJECT or not _storable(user_id):
            raise TokenError("missing_subject")
        self.user_id = user_id
        sid = claims.get("sid")
        self.session_id: str | None = str(sid) if isinstance(sid, str | int) and sid != "" else None
        if self.session_id is not None and not _storable(self.session_id):
            raise TokenError("malformed")
        roles = claims.get("roles")
        self.roles: frozenset[str] = (
            frozenset(r for r in roles if isinstance(r, str))
            if isinstance(roles, list)
            else frozenset()
        )


class KeySet:
    """The JWKS (file or URL): keys by ``kid``, re-read when an unknown ``kid`` shows up (key
    rotation) at most every ``min_refresh_s``, and anyway once older than ``max_age_s``."""

    def __init__(
        self,
        *,
        file: str | None = None,
        url: str | None = None,
        max_age_s: float = 600.0,
        min_refresh_s: float = 10.0,
        timeout_s: float = 5.0,
    ) -> None:
        if not (file or url):
            raise ValueError("a JWKS file or URL is required")
        self.file = file
        self.url = url
        self.max_age_s = max_age_s
        self.min_refresh_s = min_refresh_s
        self.timeout_s = timeout_s
        self._keys: dict[str, tuple[PyJWK, str | None]] = {}
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()

    def _read(self) -> str:
        if self.file:
            return Path(self.file).read_text(encoding="utf-8")
        assert self.url is not None
        if not self.url.startswith(("https://", "http://")):
            raise ValueError("SESSIOND_JWKS_URL must be http(s)")
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})  # noqa: S310
        with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:  # noqa: S310
            return str(resp.read(1_000_000).decode("utf-8"))

    @staticmethod
    def parse(text: str) -> dict[str, tuple[PyJWK, str | None]]:
        """Keys of a JWKS document by ``kid``; keys without ``kid`` get their index as id, keys
        PyJWT cannot use (unknown type, ``use`` other than ``sig``) are skipped."""
        doc = json.loads(text)
        keys: dict[str, tuple[PyJWK, str | None]] = {}
        for index, entry in enumerate(doc.get("keys", [])):
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = PyJWK(entry)
            except jwt.PyJWKError as exc:
                log.warning("JWKS key skipped", extra={"kid": entry.get("kid"), "error": str(exc)})
                continue
            alg = entry.get("alg")
            keys[str(entry.get("kid", index))] = (key, alg if isinstance(alg, str) else None)
        return keys

    async def refresh(self, *, force: bool = False) -> None:
        async with self._lock:
            now = time.monotonic()
            if not force and now - self._loaded_at < self.min_refresh_s:
                return
            self._loaded_at = now
            try:
                text = self._read() if self.file else await asyncio.to_thread(self._read)
                self._keys = self.parse(text)
            except Exception as exc:  # keep the previous keys; the next miss tries again
                log.warning("JWKS refresh failed", extra={"error": str(exc)[:300]})

    async def get(self, kid: str | None) -> tuple[PyJWK, str | None]:
        """The key for ``kid`` and the algorithm the JWKS declares for it (if any)."""
        if time.monotonic() - self._loaded_at > self.max_age_s:
            await self.refresh()
        key = self._lookup(kid)
        if key is None:
            await self.refresh()
            key = self._lookup(kid)
        if key is None:
            raise TokenError("unknown_key")
        return key

    def _lookup(self, kid: str | None) -> tuple[PyJWK, str | None] | None:
        if kid is None:
            # Without a kid only an unambiguous one-key set is usable.
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)


_ERRORS: Final[tuple[tuple[type[Exception], str], ...]] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.InvalidIssuerError, "bad_issuer"),
    (jwt.InvalidAudienceError, "bad_audience"),
    (InvalidSubjectError, "missing_subject"),
    (jwt.InvalidAlgorithmError, "bad_algorithm"),
    (jwt.InvalidKeyError, "bad_algorithm"),
    (jwt.PyJWKError, "unknown_key"),
)
_MISSING_CLAIM: Final = {"iss": "bad_issuer", "aud": "bad_audience", "sub": "missing_subject"}


def _reason(exc: Exception) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return _MISSING_CLAIM.get(exc.claim, "malformed")
    for kind, reason in _ERRORS:
        if isinstance(exc, kind):
            return reason
    return "malformed"


class TokenValidator:
    """Turns an ``Authorization`` header value into a ``Principal`` or raises ``TokenError``."""

    def __init__(
        self,
        settings: Settings,
        *,
        keys: KeySet | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.algorithms = frozenset(settings.algorithms)
        unknown = self.algorithms - HMAC_ALGORITHMS - ASYMMETRIC_ALGORITHMS
        if unknown or not self.algorithms:
            raise ValueError(f"unsupported SESSIOND_JWT_ALGORITHMS: {sorted(unknown)}")
        self.secret = settings.jwt_secret.encode("utf-8")
        if keys is None and (settings.jwks_file or settings.jwks_url):
            keys = KeySet(file=settings.jwks_file, url=settings.jwks_url)
        if keys is None and self.algorithms & ASYMMETRIC_ALGORITHMS:
            raise ValueError("RS*/ES* algorithms need SESSIOND_JWKS_FILE or SESSIOND_JWKS_URL")
        self.keys = keys
        self.leeway = float(settings.jwt_leeway_s)
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.max_bytes = settings.jwt_max_bytes
        self.now = now
        self.options: dict[str, Any] = {
            "require": ["exp"],
            "verify_aud": self.audience is not None,
            "verify_sub": True,
        }
        self._cache: dict[str, tuple[Principal, float]] = {}

    async def validate(self, header: str | None) -> Principal:
        if not header:
            raise TokenError("missing")
        if len(header) > self.max_bytes + 16:
            raise TokenError("too_large")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            raise TokenError("bad_scheme")
        token = token.strip()
        if not token:
            raise TokenError("missing")
        if not token.isascii():  # a JWT is base64url and dots; header bytes may be anything
            raise TokenError("malformed")
        if len(token) > self.max_bytes:
            raise TokenError("too_large")
        cached = self._cache.get(token)
        if cached is not None:
            if self.now() < cached[1]:
                return cached[0]
            del self._cache[token]
        principal, expires = await self._decode(token)
        if len(token) <= CLAIMS_CACHE_MAX_TOKEN:
            if len(self._cache) >= CLAIMS_CACHE_SIZE:
                self._cache.clear()
            self._cache[token] = (principal, expires)
        return principal

    async def _decode(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise TokenError("bad_algorithm")
        key: Any
        if alg in HMAC_ALGORITHMS:
            key = self.secret
        else:
            assert self.keys is not None
            kid = header.get("kid")
            jwk, declared = await self.keys.get(kid if isinstance(kid, str) else None)
            if declared is not None and declared != alg:
                raise TokenError("bad_algorithm")  # the JWKS pins this key to another algorithm
            key = jwk.key
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options=self.options,  # type: ignore[arg-type]
                leeway=self.leeway,
                issuer=self.issuer,
                audience=self.audience,
            )
        except jwt.PyJWTError as exc:
            raise TokenError(_reason(exc)) from None
        except (TypeError, ValueError):  # a key that cannot verify this algorithm
            raise TokenError("bad_algorithm") from None
        if not _no_duplicate_members(token) or not _numeric_times(claims):
            raise TokenError("malformed")
        principal = Principal(claims)
        exp = float(claims["exp"]) + self.leeway
        return principal, min(exp, self.now() + CLAIMS_CACHE_MAX_AGE_S)
