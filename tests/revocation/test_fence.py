"""The token fence on the real stack: after a logout of all of a user's sessions, a token issued
before it (beyond the leeway) stays refused, 401 ``revoked``, even after the next login."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from api.tokens import predates_fence
from tests.api.conftest import Api, Reply, mint

pytestmark = pytest.mark.integration
LEEWAY = 30


def test_the_rule() -> None:
    fence = 1_000_000.0
    assert not predates_fence({"iat": 1}, None, LEEWAY)  # no fence: nothing is revoked
    assert not predates_fence({}, None, LEEWAY)  # nor a token without iat
    assert predates_fence({"iat": fence - LEEWAY - 1}, fence, LEEWAY)
    assert not predates_fence({"iat": fence - LEEWAY}, fence, LEEWAY)  # within the leeway
    assert not predates_fence({"iat": fence + 5}, fence, LEEWAY)
    assert predates_fence({}, fence, LEEWAY)  # cannot show it came after: refused
    assert predates_fence({"iat": "1000000"}, fence, LEEWAY)
    assert predates_fence({"iat": True}, fence, LEEWAY)


async def logout_everywhere_then_login(api: Api, user: str) -> None:
    now = datetime.now(UTC)
    await api.event("disconnected", user, occurred_at=now)
    await api.event(
        "connected", user, session_id="new-device", occurred_at=now + timedelta(milliseconds=1)
    )


def assert_revoked(reply: Reply) -> None:
    assert reply.status == 401, reply
    assert reply.json() == {"error": "invalid_token", "reason": "revoked"}
    assert reply.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


async def test_old_sidless_token_stays_refused_after_a_new_login(api: Api) -> None:
    # Given a sid-less token issued two minutes ago, granted
    await api.event("connected", "u1")
    old = mint("u1", iat=int(time.time()) - 120)
    assert (await api.get("/auth/check", token=old)).status == 200

    # When the user logs out everywhere, then logs in again
    await logout_everywhere_then_login(api, "u1")

    # Then the old token is revoked, a token issued now is granted
    assert_revoked(await api.get("/auth/check", token=old))
    assert_revoked(await api.get("/api/me", token=old))
    assert (await api.get("/auth/check", token=mint("u1"))).status == 200
    assert (await api.get("/auth/check", token=mint("u1", sid="new-device"))).status == 200
    # And a token issued just before the logout, within the leeway, is still accepted
    near = mint("u1", iat=int(time.time()) - LEEWAY + 5)
    assert (await api.get("/auth/check", token=near)).status == 200


async def test_a_token_without_iat_is_refused_once_the_user_has_a_fence(api: Api) -> None:
    await api.event("connected", "u1")
    await api.event("connected", "u2")
    assert (await api.get("/auth/check", token=mint("u1", iat=None))).status == 200
    await logout_everywhere_then_login(api, "u1")
    assert_revoked(await api.get("/auth/check", token=mint("u1", iat=None)))
    # A user without a fence needs no iat
    assert (await api.get("/auth/check", token=mint("u2", iat=None))).status == 200


async def test_ending_one_session_sets_no_fence(api: Api) -> None:
    await api.event("connected", "u1", session_id="a")
    await api.event("connected", "u1", session_id="b")
    old = mint("u1", iat=int(time.time()) - 120)
    await api.event("disconnected", "u1", session_id="a")
    assert (await api.get("/auth/check", token=old)).status == 200


async def test_admin_disconnect_sets_the_fence(api: Api) -> None:
    await api.event("connected", "u1")
    old = mint("u1", iat=int(time.time()) - 120)
    admin = mint("root", roles=["admin"])
    assert (await api.post("/admin/users/u1/disconnect", token=admin)).status == 200
    await api.event("connected", "u1", occurred_at=datetime.now(UTC) + timedelta(seconds=1))
    assert_revoked(await api.get("/auth/check", token=old))
    assert (await api.get("/auth/check", token=mint("u1"))).status == 200
