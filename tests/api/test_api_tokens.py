"""The token matrix of issue 3, each case asserted by status and reason, over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from loadtests.harness import free_port
from tests.api.conftest import SECRET, Api, ApiFactory, mint

pytestmark = pytest.mark.integration


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def assert_invalid(reply: Any, reason: str) -> None:
    assert (reply.status, reply.json()) == (401, {"error": "invalid_token", "reason": reason})
    assert reply.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


@pytest.fixture
async def connected(api: Api) -> Api:
    await api.event("connected", "u1", name="John Doe", email="john@example.com")
    return api


async def test_valid_token_is_granted(connected: Api) -> None:
    # Given a connected user / When they present a fresh HS256 token
    reply = await connected.get("/auth/check", token=mint("u1"))
    # Then the forward-auth answer is 200 with their identity in headers
    assert reply.status == 200
    assert reply.body == b""
    assert reply.headers["X-User-Id"] == "u1"
    assert reply.headers["X-User-Email"] == "john@example.com"


async def test_user_id_claim_is_the_fallback_subject(connected: Api) -> None:
    reply = await connected.get("/auth/check", token=mint(None, user_id="u1"))
    assert reply.status == 200
    assert reply.headers["X-User-Id"] == "u1"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        pytest.param(lambda: mint("u1", ttl=-120), "expired", id="expired"),
        pytest.param(
            lambda: mint("u1", nbf=int(time.time()) + 600), "not_yet_valid", id="nbf-future"
        ),
        pytest.param(
            lambda: mint("u1", iat=int(time.time()) + 600), "not_yet_valid", id="iat-future"
        ),
        pytest.param(lambda: mint("u1", key=SECRET + "x"), "bad_signature", id="bad-signature"),
        pytest.param(
            lambda: jwt.encode({"sub": "u1", "exp": int(time.time()) + 60}, "", algorithm="none"),
            "bad_algorithm",
            id="alg-none",
        ),
        pytest.param(
            lambda: mint("u1", key=SECRET * 2, algorithm="HS512"),
            "bad_algorithm",
            id="alg-not-allowed",
        ),
        pytest.param(lambda: mint(None), "missing_subject", id="missing-sub"),
        pytest.param(lambda: mint(""), "missing_subject", id="empty-sub"),
        pytest.param(lambda: mint("u1", ttl=None), "malformed", id="missing-exp"),
        pytest.param(lambda: "garbage", "malformed", id="garbage"),
        pytest.param(lambda: "a.b.c", "malformed", id="garbage-3-parts"),
        pytest.param(lambda: mint("u1", pad="x" * 6600), "too_large", id="oversize"),
    ],
)
async def test_token_matrix(connected: Api, token: Any, reason: str) -> None:
    assert_invalid(await connected.get("/auth/check", token=token()), reason)


async def test_leeway_accepts_a_token_that_just_expired(connected: Api) -> None:
    # exp 10 s ago, leeway 30 s (CONTRACT default): still valid
    assert (await connected.get("/auth/check", token=mint("u1", ttl=-10))).status == 200


async def test_missing_header(connected: Api) -> None:
    assert_invalid(await connected.get("/auth/check"), "missing")


@pytest.mark.parametrize("value", ["Basic dTE6cHc=", "Token abc", "bearer-token"])
async def test_wrong_scheme(connected: Api, value: str) -> None:
    reply = await connected.get("/auth/check", headers={"Authorization": value})
    assert_invalid(reply, "bad_scheme")


async def test_scheme_is_case_insensitive(connected: Api) -> None:
    reply = await connected.get("/auth/check", headers={"Authorization": f"bearer {mint('u1')}"})
    assert reply.status == 200


async def test_issuer_and_audience_when_configured(api_factory: ApiFactory) -> None:
    api = await api_factory(jwt_issuer="https://idp.example", jwt_audience="sessiond")
    await api.event("connected", "u1")
    good: dict[str, Any] = {"iss": "https://idp.example", "aud": "sessiond"}
    assert (await api.get("/auth/check", token=mint("u1", **good))).status == 200
    cases: list[tuple[dict[str, Any], str]] = [
        ({**good, "iss": "https://evil.example"}, "bad_issuer"),
        ({"aud": "sessiond"}, "bad_issuer"),
        ({**good, "aud": "other"}, "bad_audience"),
        ({"iss": "https://idp.example"}, "bad_audience"),
    ]
    for claims, reason in cases:
        assert_invalid(await api.get("/auth/check", token=mint("u1", **claims)), reason)


# ----------------------------------------------------------------------------- JWKS (RS/ES)


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(private: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = RSAAlgorithm if alg.startswith("RS") else ECAlgorithm
    data: dict[str, Any] = json.loads(algorithm.to_jwk(private.public_key()))
    return {**data, "kid": kid, "alg": alg, "use": "sig"}


def _write_jwks(path: Path, *keys: dict[str, Any]) -> None:
    path.write_text(json.dumps({"keys": list(keys)}))


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return _rsa()


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
async def jwks_api(
    api_factory: ApiFactory,
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> Api:
    path = tmp_path / "jwks.json"
    _write_jwks(path, _jwk(rsa_key, "rsa-1", "RS256"), _jwk(ec_key, "ec-1", "ES256"))
    api = await api_factory(jwt_algorithms="RS256,ES256", jwks_file=str(path))
    await api.event("connected", "u1")
    return api


async def test_rs256_and_es256_with_jwks_file(
    jwks_api: Api, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    rs = mint("u1", key=rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    es = mint("u1", key=ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    assert (await jwks_api.get("/auth/check", token=rs)).status == 200
    assert (await jwks_api.get("/auth/check", token=es)).status == 200


async def test_jwks_refusals(jwks_api: Api, rsa_key: rsa.RSAPrivateKey) -> None:
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # HS256 "signed" with the RS public key as the HMAC secret (key confusion): HS256 is not
    # among the configured algorithms.
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = _b64(json.dumps({"sub": "u1", "exp": int(time.time()) + 60}).encode())
    import hashlib
    import hmac

    signature = _b64(hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    confused = f"{header}.{payload}.{signature}"
    assert_invalid(await jwks_api.get("/auth/check", token=confused), "bad_algorithm")
    # The shared secret is not accepted either when only RS/ES are configured.
    assert_invalid(await jwks_api.get("/auth/check", token=mint("u1")), "bad_algorithm")
    # Signed by another RSA key under a known kid.
    forged = mint("u1", key=_rsa(), algorithm="RS256", headers={"kid": "rsa-1"})
    assert_invalid(await jwks_api.get("/auth/check", token=forged), "bad_signature")
    # A kid nobody published.
    stranger = mint("u1", key=rsa_key, algorithm="RS256", headers={"kid": "nope"})
    assert_invalid(await jwks_api.get("/auth/check", token=stranger), "unknown_key")
    # A JWKS key pinned to ES256 used for an RS256 token.
    pinned = mint("u1", key=rsa_key, algorithm="RS256", headers={"kid": "ec-1"})
    assert_invalid(await jwks_api.get("/auth/check", token=pinned), "bad_algorithm")


async def test_jwks_file_kid_rotation(
    jwks_api: Api, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    # Given a token signed by a key that is not yet published
    new_key = _rsa()
    token = mint("u1", key=new_key, algorithm="RS256", headers={"kid": "rsa-2"})
    keys = jwks_api.app.ctx.tokens.keys
    assert keys is not None
    keys.min_refresh_s = 0  # let the next miss re-read the file at once
    assert_invalid(await jwks_api.get("/auth/check", token=token), "unknown_key")
    # When the identity provider rotates: new key published, old one retired
    _write_jwks(tmp_path / "jwks.json", _jwk(new_key, "rsa-2", "RS256"))
    # Then the unknown kid triggers a re-read and the token passes
    assert (await jwks_api.get("/auth/check", token=token)).status == 200


@pytest.fixture
def jwks_server(rsa_key: rsa.RSAPrivateKey) -> Iterator[tuple[str, list[int]]]:
    body = json.dumps({"keys": [_jwk(rsa_key, "rsa-1", "RS256")]}).encode()
    hits: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(1)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", hits
    finally:
        server.shutdown()
        server.server_close()


async def test_jwks_url_is_fetched_and_cached(
    api_factory: ApiFactory, jwks_server: tuple[str, list[int]], rsa_key: rsa.RSAPrivateKey
) -> None:
    url, hits = jwks_server
    api = await api_factory(jwt_algorithms="RS256", jwks_url=url)
    await api.event("connected", "u1")
    for n in range(3):
        token = mint("u1", key=rsa_key, algorithm="RS256", headers={"kid": "rsa-1"}, n=n)
        assert (await api.get("/auth/check", token=token)).status == 200
    assert len(hits) == 1  # fetched once at start-up, then served from memory
    unknown = mint("u1", key=rsa_key, algorithm="RS256", headers={"kid": "rsa-9"})
    for _ in range(3):
        assert_invalid(await api.get("/auth/check", token=unknown), "unknown_key")
    await asyncio.sleep(0)
    assert len(hits) == 1  # unknown kids re-fetch at most once per min_refresh_s (10 s)
