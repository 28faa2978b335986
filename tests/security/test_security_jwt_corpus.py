"""A JWT attack corpus against the served API: every entry is refused with 401 and the RFC 6750
header, by a server that accepts HS256 and RS256 (JWKS with one RSA key, ``kid`` = ``k1``)."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

from tests.api.conftest import ApiFactory
from tests.security._jwt import SECRET, b64, claims, hs256, raw

pytestmark = pytest.mark.integration

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC_PEM = KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
ATTACKER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def corpus() -> dict[str, str]:
    """Name → ``Authorization`` header value."""
    good = claims()
    valid = jwt.encode(good, SECRET, algorithm="HS256")
    h, p, s = valid.split(".")
    other_sig = jwt.encode(claims(sub="x"), SECRET).split(".")[2]
    attacker_jwk = json.loads(RSAAlgorithm.to_jwk(ATTACKER.public_key()))
    rs = {"alg": "RS256", "kid": "k1"}
    entries: dict[str, str] = {
        # alg none, in every spelling, with and without a signature
        "alg none": raw({"alg": "none", "typ": "JWT"}, good),
        "alg None": raw({"alg": "None"}, good),
        "alg NONE + sig": raw({"alg": "NONE"}, good, b"x"),
        "alg nOnE": raw({"alg": "nOnE"}, good),
        "alg missing": raw({"typ": "JWT"}, good),
        "alg empty": raw({"alg": ""}, good),
        "alg list": raw({"alg": ["HS256"]}, good),
        # algorithm confusion: the RS public key used as an HMAC secret
        "HS256 signed with RS public key": hs256({"alg": "HS256", "kid": "k1"}, good, PUBLIC_PEM),
        "HS512 (not configured)": jwt.encode(good, SECRET * 2, algorithm="HS512"),
        "ES256 (not configured)": jwt.encode(
            good, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"
        ),
        "RS256 by an attacker key": jwt.encode(good, ATTACKER, algorithm="RS256", headers=rs),
        "RS256 with embedded jwk": jwt.encode(
            good, ATTACKER, algorithm="RS256", headers={**rs, "jwk": attacker_jwk}
        ),
        "RS256 with jku/x5u": jwt.encode(
            good,
            ATTACKER,
            algorithm="RS256",
            headers={**rs, "jku": "http://127.0.0.1:1/jwks", "x5u": "http://127.0.0.1:1/x"},
        ),
        # kid tricks
        "kid path traversal": jwt.encode(
            good, ATTACKER, algorithm="RS256", headers={"kid": "../../../../dev/null"}
        ),
        "kid SQL": jwt.encode(
            good, ATTACKER, algorithm="RS256", headers={"kid": "' UNION SELECT 'k1'--"}
        ),
        "kid huge": jwt.encode(good, ATTACKER, algorithm="RS256", headers={"kid": "k" * 6000}),
        "kid NUL": jwt.encode(good, ATTACKER, algorithm="RS256", headers={"kid": "k1\x00"}),
        "kid object": raw({"alg": "RS256", "kid": {"$ne": ""}}, good, b"sig"),
        "kid on HS256 with a path": hs256({"alg": "HS256", "kid": "/dev/null"}, good, b""),
        # huge and odd headers
        "header 6 KB of junk": hs256({"alg": "HS256", "x": "y" * 6000}, good, b"wrong"),
        "token over the size limit": hs256({"alg": "HS256", "x": "y" * 6300}, good),
        "crit unknown extension": hs256({"alg": "HS256", "crit": ["exp2"], "exp2": 1}, good),
        "b64 false": hs256({"alg": "HS256", "b64": False, "crit": ["b64"]}, good),
        # duplicate members: another parser could read the other value
        "duplicate sub": hs256(
            b'{"alg":"HS256"}',
            b'{"sub":"admin","sub":"victim","exp":%d}' % good["exp"],
        ),
        "duplicate alg": hs256(b'{"alg":"none","alg":"HS256"}', json.dumps(good).encode()),
        "duplicate exp": hs256(b'{"alg":"HS256"}', b'{"sub":"v","exp":1,"exp":%d}' % good["exp"]),
        # not UTF-8, not JSON, not an object
        "header not UTF-8": hs256(b'\xff\xfe{"alg":"HS256"}', good),
        "payload not UTF-8": hs256({"alg": "HS256"}, b'{"sub":"\xff","exp":9999999999}'),
        "payload a list": hs256({"alg": "HS256"}, b'["victim"]'),
        "payload a string": hs256({"alg": "HS256"}, b'"victim"'),
        "nested JWT": hs256({"alg": "HS256", "cty": "JWT"}, json.dumps(valid).encode()),
        "sub lone surrogate": hs256({"alg": "HS256"}, {**good, "sub": "\ud800"}),
        "sub NUL": hs256({"alg": "HS256"}, {**good, "sub": "vic\x00tim"}),
        "sub too long": hs256({"alg": "HS256"}, {**good, "sub": "v" * 129}),
        "sub bool": hs256({"alg": "HS256"}, {**good, "sub": True}),
        # signatures
        "empty signature": f"{h}.{p}.",
        "signature stripped": f"{h}.{p}",
        "tampered payload": f"{h}.{b64(json.dumps({**good, 'sub': 'admin'}).encode())}.{s}",
        "signature of another token": f"{h}.{p}.{other_sig}",
        "signature not base64": f"{h}.{p}.!!!!",
        "four segments": f"{valid}.{s}",
        "padding and +/": f"{h}==.{p}.{s.replace('-', '+').replace('_', '/')}",
        # times
        "expired": jwt.encode({**good, "exp": good["exp"] - 3600}, SECRET),
        "no exp": jwt.encode({"sub": "victim"}, SECRET),
        "exp string": hs256({"alg": "HS256"}, {**good, "exp": str(good["exp"])}),
        "exp infinite": hs256({"alg": "HS256"}, b'{"sub":"v","exp":1e400}'),
        "exp NaN": hs256({"alg": "HS256"}, b'{"sub":"v","exp":NaN}'),
        "nbf in the future": jwt.encode({**good, "nbf": good["exp"]}, SECRET),
        "iat in the future": jwt.encode({**good, "iat": good["exp"] + 3600}, SECRET),
        # the Authorization header itself
        "Basic scheme": "Basic dXNlcjpwYXNz",
        "Bearer only": "Bearer ",
        "token without scheme": valid,
        "two tokens": f"Bearer {valid} {valid}",
    }
    as_is = {"Basic scheme", "Bearer only", "token without scheme", "two tokens"}
    return {name: v if name in as_is else f"Bearer {v}" for name, v in entries.items()}


async def test_attack_corpus_is_refused_with_401(api_factory: ApiFactory, tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(KEY.public_key()))
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}))
    api = await api_factory(jwt_algorithms="HS256,RS256", jwks_file=str(jwks))
    # The victim is connected, so that anything but a refused token would be a 200
    await api.event("connected", "victim")
    await api.event("connected", "admin")
    sanity = jwt.encode(claims(), SECRET)
    assert (await api.get("/auth/check", token=sanity)).status == 200
    rs_valid = jwt.encode(claims(), KEY, algorithm="RS256", headers={"kid": "k1"})
    assert (await api.get("/auth/check", token=rs_valid)).status == 200

    wrong: dict[str, Any] = {}
    for name, value in corpus().items():
        for route in ("/auth/check", "/api/me", "/admin/users/victim"):
            reply = await api.get(route, headers={"Authorization": value})
            body = reply.json() if reply.body else None
            if (
                reply.status != 401
                or reply.headers.get("WWW-Authenticate") != 'Bearer error="invalid_token"'
                or not isinstance(body, dict)
                or body.get("error") != "invalid_token"
            ):
                wrong[f"{name} {route}"] = (reply.status, body)
    assert wrong == {}


def raw_statuses(host: str, port: int) -> list[bytes]:
    """Status lines for headers urllib cannot send: bytes that are not UTF-8, and 40 KB."""
    statuses = []
    for value in (
        b"Bearer \xff\xfe\xfd",
        b"Bearer " + "\u00e9".encode() * 10,
        b"Bearer " + b"a" * 40_000,
    ):
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"GET /auth/check HTTP/1.1\r\nHost: x\r\nAuthorization: " + value)
            sock.sendall(b"\r\n\r\n")
            statuses.append(sock.recv(100).split(b"\r\n", 1)[0])
    return statuses


async def test_header_not_utf8_or_oversized(api_factory: ApiFactory) -> None:
    api = await api_factory()
    await api.event("connected", "victim")
    url = urlsplit(api.url)
    statuses = await asyncio.to_thread(raw_statuses, url.hostname or "", url.port or 80)
    # Not UTF-8: 401 like any other bad token; larger than REQUEST_MAX_HEADER_SIZE: Sanic refuses
    # it before any parsing (413). Never a 5xx.
    assert statuses == [
        b"HTTP/1.1 401 Unauthorized",
        b"HTTP/1.1 401 Unauthorized",
        b"HTTP/1.1 413 Request Entity Too Large",
    ]
