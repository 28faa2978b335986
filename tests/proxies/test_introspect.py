"""``POST /oauth2/introspect`` (RFC 7662): who may ask, what an active token gets, and exactly
``{"active": false}`` for anything else, within 100 ms of a logout."""

from __future__ import annotations

import asyncio
import base64
import statistics
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest

from tests.api.conftest import Api, ApiFactory, Reply, mint

pytestmark = pytest.mark.integration

CLIENTS = "gateway:s3cret-gateway,kong:p%40ss:word"
OTHER_KEY = "another-secret-that-is-long-enough-for-hs256"


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


GATEWAY = basic("gateway", "s3cret-gateway")


def post_form(url: str, form: dict[str, str] | None, authorization: str | None) -> Reply:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if authorization is not None:
        headers["Authorization"] = authorization
    data = urlencode(form or {}).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return Reply(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return Reply(err.code, err.headers, err.read())


class Introspection:
    def __init__(self, api: Api) -> None:
        self.url = api.url + "/oauth2/introspect"

    async def __call__(
        self, token: str | None, authorization: str | None = GATEWAY, **form: str
    ) -> Reply:
        if token is not None:
            form["token"] = token
        reply = await asyncio.to_thread(post_form, self.url, form, authorization)
        assert reply.headers["Cache-Control"] == "no-store"
        return reply


@pytest.fixture
async def introspect_api(api_factory: ApiFactory) -> Api:
    return await api_factory(introspection_clients=CLIENTS)


@pytest.fixture
def introspect(introspect_api: Api) -> Introspection:
    return Introspection(introspect_api)


async def test_active_token_gets_its_members(introspect_api: Api, introspect: Any) -> None:
    api = introspect_api
    await api.event("connected", "42", session_id="laptop", name="John Doe")
    token = mint("42", sid="laptop", scope="read write", azp="web", iss="https://sso.example")
    reply = await introspect(token, token_type_hint="access_token")
    assert reply.status == 200
    body = reply.json()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert body == {
        "active": True,
        "sub": "42",
        "sid": "laptop",
        "exp": claims["exp"],
        "iat": claims["iat"],
        "iss": "https://sso.example",
        "scope": "read write",
        "client_id": "web",
        "username": "John Doe",
        "token_type": "Bearer",
    }


async def test_inactive_is_exactly_active_false(introspect_api: Api, introspect: Any) -> None:
    api = introspect_api
    await api.event("connected", "43", session_id="a")
    for token in [
        mint("nobody"),
        mint("43", sid="b"),
        mint("43", ttl=-120),
        mint("43", key=OTHER_KEY),
        "garbage",
        "a b",
    ]:
        reply = await introspect(token)
        assert (reply.status, reply.json()) == (200, {"active": False}), token
    # The reason is kept for the journal and the metrics, not the caller
    metrics = (await api.get("/metrics")).body.decode()
    assert 'route="/oauth2/introspect",decision="forbidden",reason="session_ended"' in metrics
    assert 'route="/oauth2/introspect",decision="invalid_token",reason="expired"' in metrics


async def test_inactive_within_100_ms_of_a_logout(introspect_api: Api, introspect: Any) -> None:
    api = introspect_api
    delays = []
    for n in range(5):
        # Given an active token
        await api.event("connected", f"44-{n}", session_id="s")
        token = mint(f"44-{n}", sid="s")
        assert (await introspect(token)).json()["active"] is True
        # When the logout is applied, the next introspection says inactive
        await api.event("disconnected", f"44-{n}", session_id="s")
        applied = time.monotonic()
        assert (await introspect(token)).json() == {"active": False}
        delays.append(time.monotonic() - applied)
    # Median of five: one scheduling hiccup of a loaded machine does not decide
    assert statistics.median(delays) < 0.1, delays


async def test_callers(introspect_api: Api, introspect: Any) -> None:
    api = introspect_api
    await api.event("connected", "45")
    token = mint("45")
    # A configured client (id and secret form-urlencoded, RFC 6749 §2.3.1) may ask
    assert (await introspect(token, basic("kong", "p%2540ss%3Aword"))).json()["active"] is True
    # A wrong secret, an unknown client, no credentials: 401 with a Basic challenge
    for authorization in [
        basic("gateway", "wrong"),
        basic("gateway", "s3cret-gateway-and-more"),
        basic("nobody", "s3cret-gateway"),
        "Basic !!!",
        None,
    ]:
        reply = await introspect(token, authorization)
        assert reply.status == 401, authorization
        assert reply.headers["WWW-Authenticate"].startswith('Basic realm="sessiond"')
        assert reply.json()["error"] == "invalid_client"
        assert "active" not in reply.json()
    # A bearer token with role introspect may ask; without it, or invalid, it may not
    service = mint("svc", roles=["introspect"])
    assert (await introspect(token, f"Bearer {service}")).json()["active"] is True
    for authorization in [f"Bearer {mint('svc', roles=['admin'])}", "Bearer garbage"]:
        reply = await introspect(token, authorization)
        assert reply.status == 401
        assert "Bearer error=" in reply.headers["WWW-Authenticate"]
    # No token in the form: 400 invalid_request
    assert (await introspect(None)).status == 400


async def test_without_configured_clients_basic_is_refused(api: Api) -> None:
    introspect = Introspection(api)
    reply = await introspect(mint("x"), GATEWAY)
    assert reply.status == 401
    reply = await introspect(mint("x"), f"Bearer {mint('svc', roles=['introspect'])}")
    assert reply.json() == {"active": False}


async def test_fenced_token_is_inactive_after_a_new_login(
    introspect_api: Api, introspect: Any
) -> None:
    api = introspect_api
    await api.event("connected", "46", session_id="a")
    old = mint("46", iat=int(time.time()) - 600)
    assert (await introspect(old)).json()["active"] is True
    # When the user logs out everywhere and back in, the token issued before stays inactive
    await api.event("disconnected", "46")
    await api.event("connected", "46", session_id="b")
    assert (await introspect(old)).json() == {"active": False}
    assert (await introspect(mint("46"))).json()["active"] is True
