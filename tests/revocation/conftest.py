"""Revocation sources on real servers: the in-process API with a JWKS of freshly made keys, and
logout tokens minted the way an identity provider signs them."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from api.logout_token import EVENT
from tests.api.conftest import Reply, api, api_factory

__all__ = ["api", "api_factory"]

ISSUER = "https://sso.example.com/realms/myrealm"
AUDIENCE = "sessiond-rp"


def jwk(private: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = RSAAlgorithm if alg.startswith(("RS", "PS")) else ECAlgorithm
    data: dict[str, Any] = json.loads(algorithm.to_jwk(private.public_key()))
    return {**data, "kid": kid, "alg": alg, "use": "sig"}


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def jwks_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: Any) -> Path:
    path = tmp_path / "jwks.json"
    keys = [jwk(rsa_key, "rsa-1", "RS256"), jwk(ec_key, "ec-1", "ES256")]
    path.write_text(json.dumps({"keys": keys}))
    return path


def logout_token(
    key: Any, *, alg: str = "RS256", kid: str | None = "rsa-1", **overrides: Any
) -> str:
    """A logout token as §2.4 describes it; ``overrides`` replace claims (``None`` drops one)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 120,
        "jti": str(uuid.uuid4()),
        "events": {EVENT: {}},
        "sub": "u1",
        "sid": "s1",
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    headers = {"typ": "logout+jwt", **({"kid": kid} if kid else {})}
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def post_form(
    url: str, fields: list[tuple[str, str]] | None, *, content_type: str | None = None
) -> Reply:
    """A blocking form POST (the back-channel request of §2.5); errors are returned."""
    body = urllib.parse.urlencode(fields or []).encode()
    headers = {"Content-Type": content_type or "application/x-www-form-urlencoded"}
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return Reply(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return Reply(err.code, err.headers, err.read())
