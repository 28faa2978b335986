"""Admin view of a user's sessions (device data) and revocation of one session through the API:
the next request carrying that ``sid`` is refused, the user's other sessions keep working."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from tests.api.conftest import Api, Reply, http, mint
from tests.sessions.conftest import kinds, outbox_rows

pytestmark = pytest.mark.integration

ADMIN = mint("root", roles=["admin"], ttl=86_400)  # minted at collection: outlives the suite


async def delete(api: Api, path: str, **kwargs: Any) -> Reply:
    return await asyncio.to_thread(http, api.url + path, method="DELETE", **kwargs)


async def test_sessions_list_device_data(api: Api, raw_pg: asyncpg.Connection) -> None:
    await api.event("connected", "u1", session_id="a", ip_address="10.0.0.7", source="keycloak")
    await api.event("connected", "u1", session_id="b")
    body = (await api.get("/admin/users/u1", token=ADMIN)).json()
    sessions = {s["session_id"]: s for s in body["sessions"]}
    assert sessions["a"]["ip_address"] == "10.0.0.7"
    assert sessions["b"]["ip_address"] is None


async def test_revoking_one_session_refuses_its_sid_at_once(
    api: Api, raw_pg: asyncpg.Connection
) -> None:
    # Given a user with two sessions, both granted
    await api.event("connected", "u1", session_id="a")
    await api.event("connected", "u1", session_id="b")
    for sid in ("a", "b"):
        assert (await api.get("/auth/check", token=mint("u1", sid=sid))).status == 200

    # When an admin revokes session a (its owner looked up by id)
    reply = await delete(api, "/admin/sessions/a", token=ADMIN)

    # Then a's next request is refused, b's still passes, the user stays connected
    assert reply.status == 200
    assert reply.json() == {
        "user_id": "u1", "session_id": "a", "status": "connected", "ended_sessions": ["a"],
    }  # fmt: skip
    refused = await api.get("/auth/check", token=mint("u1", sid="a"))
    assert (refused.status, refused.json()["reason"]) == (403, "session_ended")
    assert (await api.get("/auth/check", token=mint("u1", sid="b"))).status == 200
    # And the session shows as ended by an admin, announced as such
    body = (await api.get("/admin/users/u1", token=ADMIN)).json()
    ended = {s["session_id"]: s["end_reason"] for s in body["sessions"]}
    assert ended == {"a": "admin", "b": None}
    assert kinds(await outbox_rows(raw_pg, "u1"))[-1] == ("session.ended", "a", "admin")

    # When the last session is revoked, the user is disconnected
    reply = await delete(api, "/admin/sessions/b?user_id=u1", token=ADMIN)
    assert reply.json()["status"] == "disconnected"
    refused = await api.get("/auth/check", token=mint("u1"))
    assert (refused.status, refused.json()["reason"]) == (403, "not_connected")
    assert kinds(await outbox_rows(raw_pg, "u1"))[-2:] == [
        ("session.ended", "b", "admin"),
        ("user.disconnected", None, "admin"),
    ]
    # Revoking it again is harmless
    again = await delete(api, "/admin/sessions/b?user_id=u1", token=ADMIN)
    assert (again.status, again.json()["ended_sessions"]) == (200, [])


async def test_session_id_held_by_two_users_needs_user_id(api: Api) -> None:
    await api.event("connected", "u1", session_id="same")
    await api.event("connected", "u2", session_id="same")
    reply = await delete(api, "/admin/sessions/same", token=ADMIN)
    assert (reply.status, reply.json()) == (
        409,
        {"error": "conflict", "reason": "ambiguous_session"},
    )
    reply = await delete(api, "/admin/sessions/same?user_id=u2", token=ADMIN)
    assert (reply.status, reply.json()["ended_sessions"]) == (200, ["same"])
    assert (await api.get("/auth/check", token=mint("u1", sid="same"))).status == 200
    assert (await api.get("/auth/check", token=mint("u2", sid="same"))).status == 403


async def test_unknown_session_and_non_admin(api: Api) -> None:
    await api.event("connected", "u1", session_id="a")
    missing = await delete(api, "/admin/sessions/nope", token=ADMIN)
    assert (missing.status, missing.json()) == (404, {"error": "not_found"})
    wrong_user = await delete(api, "/admin/sessions/a?user_id=u2", token=ADMIN)
    assert wrong_user.status == 404
    denied = await delete(api, "/admin/sessions/a", token=mint("u1", roles=["user"]))
    assert (denied.status, denied.json()["reason"]) == (403, "missing_role")
    assert (await api.get("/auth/check", token=mint("u1", sid="a"))).status == 200
