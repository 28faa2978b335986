"""``POST /oidc/backchannel-logout`` on the real stack: valid logout tokens end what they name,
after the commit; every invalid one is 400 ``invalid_request`` and changes nothing."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from api.logout_token import EVENT
from storage.revocation import jti_key
from tests.api.conftest import SECRET, Api, ApiFactory, Reply, mint
from tests.revocation.conftest import AUDIENCE, ISSUER, logout_token, post_form
from tests.security._jwt import b64, raw

pytestmark = pytest.mark.integration
ROUTE = "/oidc/backchannel-logout"


@pytest.fixture
async def bc_api(
    pg: asyncpg.Connection, redis: aioredis.Redis, api_factory: ApiFactory, jwks_file: Path
) -> Api:
    """Back-channel logout on: two accepted audiences, the IdP's issuer, its JWKS; u1 on two
    devices (after ``pg`` and ``redis`` emptied the stores)."""
    api = await api_factory(
        jwks_file=str(jwks_file),
        backchannel_audience=f"{AUDIENCE}, other-rp",
        backchannel_issuer=ISSUER,
    )
    await api.event("connected", "u1", session_id="s1")
    await api.event("connected", "u1", session_id="s2")
    return api


async def send(api: Api, token: str | None, **kwargs: Any) -> Reply:
    fields = None if token is None else [("logout_token", token)]
    return await asyncio.to_thread(post_form, api.url + ROUTE, fields, **kwargs)


async def check(api: Api, user: str, sid: str | None = None) -> int:
    return (await api.get("/auth/check", token=mint(user, sid=sid))).status


async def state(pg: asyncpg.Connection) -> list[Any]:
    """Everything a logout could change: sessions, users, journal, outbox."""
    return [
        [tuple(r) for r in await pg.fetch(f"SELECT * FROM {table} ORDER BY 1, 2")]
        for table in ("sessions", "users", "audit_events", "outbox")
    ]


def assert_ok(reply: Reply) -> None:
    assert (reply.status, reply.body) == (200, b""), reply.body
    assert reply.headers["Cache-Control"] == "no-store"


def assert_invalid(reply: Reply) -> None:
    assert reply.status == 400, reply.body
    assert reply.json() == {"error": "invalid_request"}
    assert reply.headers["Cache-Control"] == "no-store"


async def test_off_until_an_audience_is_configured(api: Api, rsa_key: rsa.RSAPrivateKey) -> None:
    reply = await send(api, logout_token(rsa_key))
    assert reply.status == 404
    assert reply.headers["Cache-Control"] == "no-store"


async def test_sid_ends_that_session_only(
    bc_api: Api, rsa_key: rsa.RSAPrivateKey, pg: asyncpg.Connection
) -> None:
    # Given u1 on two devices; when the IdP logs out session s1
    assert_ok(await send(bc_api, logout_token(rsa_key, sid="s1")))

    # Then s1 is refused at once (the answer came after the commit), s2 still granted
    assert await check(bc_api, "u1", "s1") == 403
    assert await check(bc_api, "u1", "s2") == 200
    rows = await pg.fetch("SELECT session_id, status, end_reason FROM sessions ORDER BY 1")
    assert [tuple(r) for r in rows] == [
        ("s1", "ended", "backchannel_logout"), ("s2", "connected", None),
    ]  # fmt: skip
    outbox = await pg.fetch("SELECT type, session_id, reason FROM outbox ORDER BY id")
    assert ("session.ended", "s1", "backchannel_logout") in [tuple(r) for r in outbox]
    metrics = (await bc_api.get("/metrics")).body.decode()
    assert 'sessiond_backchannel_logout_total{result="ok"} 1' in metrics


async def test_sid_without_sub_finds_the_owner(
    bc_api: Api, ec_key: Any, pg: asyncpg.Connection
) -> None:
    token = logout_token(ec_key, alg="ES256", kid="ec-1", sub=None, sid="s2", aud=["other-rp"])
    assert_ok(await send(bc_api, token))
    assert await check(bc_api, "u1", "s2") == 403
    assert await check(bc_api, "u1", "s1") == 200


async def test_sub_alone_ends_every_session_of_the_user(
    bc_api: Api, rsa_key: rsa.RSAPrivateKey, pg: asyncpg.Connection
) -> None:
    old = mint("u1", iat=int(time.time()) - 120)
    assert_ok(await send(bc_api, logout_token(rsa_key, sid=None)))
    assert await check(bc_api, "u1", "s1") == 403
    assert await check(bc_api, "u1", "s2") == 403
    assert await pg.fetchval("SELECT status FROM users WHERE id = 'u1'") == "disconnected"
    # And the fence is set: after a new login, the old token stays refused
    await bc_api.event("connected", "u1", session_id="s3")
    reply = await bc_api.get("/auth/check", token=old)
    assert (reply.status, reply.json()["reason"]) == (401, "revoked")
    assert await check(bc_api, "u1", "s3") == 200


async def test_a_session_nobody_holds_is_a_successful_no_op(
    bc_api: Api, rsa_key: rsa.RSAPrivateKey, pg: asyncpg.Connection
) -> None:
    before = await state(pg)
    assert_ok(await send(bc_api, logout_token(rsa_key, sub=None, sid="unknown")))
    assert await state(pg) == before


async def test_jti_is_remembered_for_the_tokens_lifetime(
    bc_api: Api, rsa_key: rsa.RSAPrivateKey, redis: aioredis.Redis
) -> None:
    token = logout_token(rsa_key, jti="jti-ttl")
    assert_ok(await send(bc_api, token))
    ttl = await redis.ttl(jti_key(ISSUER, "jti-ttl"))
    assert 120 <= ttl <= 120 + 2 * 30 + 2  # exp (iat + 120) plus the leeway


def _hs256_with(secret: bytes, claims: dict[str, Any]) -> str:
    signing = raw({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims).rsplit(".", 1)[0]
    signature = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(signature)}"


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 60, "jti": "j-corpus",
            "events": {EVENT: {}}, "sub": "u1", "sid": "s1"}  # fmt: skip
    return {**base, **overrides}


def corpus(key: rsa.RSAPrivateKey) -> dict[str, str]:
    """Each invalid logout token, by what is wrong with it."""
    now = int(time.time())
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "nonce": logout_token(key, nonce="n-1"),
        "wrong aud": logout_token(key, aud="someone-else"),
        "no aud": logout_token(key, aud=None),
        "wrong iss": logout_token(key, iss="https://evil.example"),
        "no iss": logout_token(key, iss=None),
        "no events": logout_token(key, events=None),
        "events without the logout member": logout_token(key, events={"x": {}}),
        "events member not an object": logout_token(key, events={EVENT: "yes"}),
        "stale iat": logout_token(key, iat=now - 3600, exp=now + 60),
        "iat from the future": logout_token(key, iat=now + 3600, exp=now + 7200),
        "no iat": logout_token(key, iat=None),
        "expired": logout_token(key, iat=now, exp=now - 3600),
        "alg none": raw({"alg": "none", "typ": "JWT"}, _claims()),
        "HS256 with the shared secret": jwt.encode(_claims(), SECRET, algorithm="HS256"),
        "HS256 with the RSA public key": _hs256_with(public_pem, _claims()),
        "neither sub nor sid": logout_token(key, sub=None, sid=None),
        "no jti": logout_token(key, jti=None),
        "empty sid": logout_token(key, sub=None, sid=""),
        "sub not a string": logout_token(key, sub=42, sid=None),
        "signed by another key": logout_token(other, kid="rsa-1"),
        "unknown kid": logout_token(key, kid="nope"),
        "RS256 under an ES256 kid": logout_token(key, kid="ec-1"),
        "not a JWT": "not-a-jwt",
        "duplicate members": raw({"alg": "RS256", "kid": "rsa-1"}, b'{"sub":"a","sub":"b"}'),
    }


async def test_every_invalid_token_is_refused_and_changes_nothing(
    bc_api: Api, rsa_key: rsa.RSAPrivateKey, pg: asyncpg.Connection
) -> None:
    before = await state(pg)
    for name, token in corpus(rsa_key).items():
        reply = await send(bc_api, token)
        assert reply.status == 400, (name, reply.status, reply.body)
        assert_invalid(reply)
    # Requests that carry no single form-encoded token at all
    assert_invalid(await send(bc_api, None))
    body = json.dumps({"logout_token": logout_token(rsa_key)})
    assert_invalid(await send(bc_api, body, content_type="application/json"))
    two = [("logout_token", logout_token(rsa_key)), ("logout_token", logout_token(rsa_key))]
    assert_invalid(await asyncio.to_thread(post_form, bc_api.url + ROUTE, two))
    # Then: no state change at all, both sessions still granted
    assert await state(pg) == before
    assert await check(bc_api, "u1", "s1") == 200
    assert await check(bc_api, "u1", "s2") == 200
    metrics = (await bc_api.get("/metrics")).body.decode()
    for result in ("nonce", "bad_aud", "bad_iss", "bad_events", "stale_iat", "bad_algorithm"):
        assert f'sessiond_backchannel_logout_total{{result="{result}"}}' in metrics, result


async def test_a_replayed_token_is_refused_even_after_a_new_login(
    bc_api: Api, rsa_key: rsa.RSAPrivateKey, pg: asyncpg.Connection
) -> None:
    # Given a logout token that was accepted once
    token = logout_token(rsa_key, sid="s1")
    assert_ok(await send(bc_api, token))
    # And the user logs in on s1 again
    await bc_api.event("connected", "u1", session_id="s1")
    assert await check(bc_api, "u1", "s1") == 200
    before = await state(pg)

    # When the same token comes again: 400, and s1 stays granted
    assert_invalid(await send(bc_api, token))
    assert await state(pg) == before
    assert await check(bc_api, "u1", "s1") == 200
