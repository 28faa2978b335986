"""nginx, Traefik and Caddy, each with the configuration ``docs/proxies/`` shows, in front of an
application: a granted request reaches it with the identity sessiond vouches for, a refusal
reaches the client as sessiond wrote it (status, JSON body, challenge), and identity headers a
client makes up never reach the application."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import unquote

import pytest

from tests.api.conftest import Api, mint
from tests.proxies.conftest import Echo

pytestmark = pytest.mark.integration

OTHER_KEY = "another-secret-that-is-long-enough-for-hs256"
FORGED = {"X-User-Id": "ceo", "X-User-Email": "ceo@corp.example", "X-Session-Id": "ceo-laptop"}


def call(url: str, token: str | None = None, headers: dict[str, str] | None = None) -> Any:
    """(status, headers, body) of one request through the proxy; refusals are returned."""
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, headers=all_headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read()


async def through(proxy: str, path: str, token: str | None = None, **headers: str) -> Any:
    return await asyncio.to_thread(
        call, proxy + path, token, {k.replace("_", "-"): v for k, v in headers.items()}
    )


def identity(seen: dict[str, Any]) -> dict[str, list[str]]:
    """The identity headers the application received (every value, absent = [])."""
    names = ("x-user-id", "x-user-email", "x-session-id")
    return {name: seen["headers"].get(name, []) for name in names}


async def test_granted_reaches_the_application_with_the_identity(
    api: Api, echo: Echo, proxy: str
) -> None:
    # Given a connected user with an e-mail and a session
    await api.event("connected", "42", session_id="laptop", email="j@example.com")
    # When a request with their token goes through the proxy, with forged identity headers
    status, _, body = await through(proxy, "/orders/7?x=1", mint("42", sid="laptop"), **FORGED)
    # Then the application answered it and saw sessiond's identity, once, not the client's
    assert status == 200, body
    seen = json.loads(body)
    assert seen["path"] == "/orders/7?x=1"
    assert identity(seen) == {
        "x-user-id": ["42"],
        "x-user-email": ["j@example.com"],
        "x-session-id": ["laptop"],
    }


async def test_unknown_identity_fields_overwrite_forged_ones(
    api: Api, echo: Echo, proxy: str
) -> None:
    # Given a user without e-mail, and a token without sid
    await api.event("connected", "43")
    # When the client adds its own e-mail and session headers
    status, _, body = await through(proxy, "/", mint("43"), **FORGED)
    # Then none of them reaches the application: empty or absent, never the forged value
    assert status == 200, body
    seen = identity(json.loads(body))
    assert seen["x-user-id"] == ["43"]
    assert seen["x-user-email"] in ([], [""])
    assert seen["x-session-id"] in ([], [""])


async def test_refusals_pass_through_with_their_bodies(api: Api, echo: Echo, proxy: str) -> None:
    await api.event("connected", "44", session_id="phone")
    # No token: 401 with sessiond's body and RFC 6750 challenge
    status, headers, body = await through(proxy, "/", None, **FORGED)
    assert status == 401
    assert json.loads(body) == {"error": "invalid_token", "reason": "missing"}
    assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    # A bad signature: 401 bad_signature
    status, _, body = await through(proxy, "/", mint("44", key=OTHER_KEY))
    assert (status, json.loads(body)["reason"]) == (401, "bad_signature")
    # A user who is not connected, and a session that ended: 403 with the reason
    status, _, body = await through(proxy, "/", mint("nobody"), **FORGED)
    assert (status, json.loads(body)) == (403, {"error": "forbidden", "reason": "not_connected"})
    status, _, body = await through(proxy, "/", mint("44", sid="gone"))
    assert (status, json.loads(body)) == (403, {"error": "forbidden", "reason": "session_ended"})
    # And the application saw none of these requests
    assert echo.seen == []
    # Once the user disconnects, the proxy refuses the token that worked
    assert (await through(proxy, "/", mint("44", sid="phone")))[0] == 200
    await api.event("disconnected", "44")
    assert (await through(proxy, "/", mint("44", sid="phone")))[0] == 403
    assert len(echo.seen) == 1


async def test_identities_stay_distinct_through_the_proxy(api: Api, echo: Echo, proxy: str) -> None:
    # Given two users whose ids would collide under a non-injective encoding
    await api.event("connected", "café", email="zoë@exämple.com")
    await api.event("connected", "caf%C3%A9", email="zo%C3%AB@ex%C3%A4mple.com")
    # When each calls through the proxy
    first = identity(json.loads((await through(proxy, "/", mint("café")))[2]))
    second = identity(json.loads((await through(proxy, "/", mint("caf%C3%A9")))[2]))
    # Then the application sees two different values, each decoding to its own user
    assert first["x-user-id"] != second["x-user-id"]
    assert [unquote(v) for v in first["x-user-id"]] == ["café"]
    assert [unquote(v) for v in second["x-user-id"]] == ["caf%C3%A9"]
    assert [unquote(v) for v in first["x-user-email"]] == ["zoë@exämple.com"]
    assert [unquote(v) for v in second["x-user-email"]] == ["zo%C3%AB@ex%C3%A4mple.com"]
