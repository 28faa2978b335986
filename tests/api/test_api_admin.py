"""Admin routes: role guard, user and sessions, keyset pagination, forced disconnect."""

from __future__ import annotations

import asyncio

import pytest

from storage.db import conn
from tests.api.conftest import Api, http, mint

pytestmark = pytest.mark.integration

ADMIN = mint("root", roles=["admin"], ttl=86_400)  # minted at collection: outlives the suite


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/users/1"),
        ("GET", "/admin/users"),
        ("POST", "/admin/users/1/disconnect"),
    ],
)
async def test_admin_routes_refuse_non_admin_tokens(api: Api, method: str, path: str) -> None:
    await api.event("connected", "1")
    send = api.get if method == "GET" else api.post
    # A valid token of an active user without the role
    reply = await send(path, token=mint("1", roles=["user"]))
    assert (reply.status, reply.json()) == (403, {"error": "forbidden", "reason": "missing_role"})
    # No token at all
    reply = await send(path)
    assert (reply.status, reply.json()["reason"]) == (401, "missing")
    # The user is still connected: nothing happened
    assert (await api.get("/auth/check", token=mint("1"))).status == 200


async def test_user_and_sessions(api: Api) -> None:
    await api.event("connected", "1", name="John", email="j@example.com", session_id="a",
                    ip_address="10.0.0.1")  # fmt: skip
    await api.event("connected", "1", session_id="b")
    await api.event("disconnected", "1", session_id="a")
    reply = await api.get("/admin/users/1", token=ADMIN)
    assert reply.status == 200
    body = reply.json()
    assert body["user"]["user_id"] == "1"
    assert body["user"]["status"] == "connected"
    assert body["user"]["email"] == "j@example.com"
    sessions = {s["session_id"]: s for s in body["sessions"]}
    assert set(sessions) == {"a", "b"}
    assert sessions["a"]["status"] == "ended" and sessions["a"]["end_reason"] == "logout"
    assert sessions["a"]["ip_address"] == "10.0.0.1"
    assert sessions["b"]["status"] == "connected" and sessions["b"]["ended_at"] is None
    assert set(sessions["a"]) == {
        "session_id", "status", "started_at", "ended_at", "end_reason", "ip_address",
    }  # fmt: skip
    missing = await api.get("/admin/users/nobody", token=ADMIN)
    assert (missing.status, missing.json()) == (404, {"error": "not_found"})


async def test_users_keyset_pagination(api: Api) -> None:
    for uid in ("u1", "u2", "u3", "u4", "u5"):
        await api.event("connected", uid)
    await api.event("disconnected", "u3")
    seen: list[str] = []
    cursor = ""
    while True:
        reply = await api.get(f"/admin/users?status=connected&limit=2&cursor={cursor}",
                              token=ADMIN)  # fmt: skip
        assert reply.status == 200
        page = reply.json()
        assert len(page["users"]) <= 2
        seen += [u["user_id"] for u in page["users"]]
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert seen == ["u1", "u2", "u4", "u5"]
    everyone = (await api.get("/admin/users", token=ADMIN)).json()
    assert [u["user_id"] for u in everyone["users"]] == ["u1", "u2", "u3", "u4", "u5"]
    assert everyone["next_cursor"] is None
    for bad in (
        "status=gone",
        "limit=0",
        "limit=x",
        "limit=5000",
        "cursor=%00",
        "cursor=" + "x" * 129,
    ):
        reply = await api.get(f"/admin/users?{bad}", token=ADMIN)
        assert (reply.status, reply.json()["error"]) == (400, "bad_request")


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        # Sanic's router matches no route for a NUL in the path
        ("GET", "/admin/users/a%00b", (404, "not_found")),
        ("POST", "/admin/users/a%00b/disconnect", (404, "not_found")),
        ("DELETE", "/admin/sessions/a%00b", (404, "not_found")),
        ("DELETE", "/admin/sessions/s1?user_id=a%00b", (400, "bad_request")),
        ("GET", "/admin/users/" + "x" * 129, (400, "bad_request")),
        ("DELETE", "/admin/sessions/" + "x" * 129, (400, "bad_request")),
    ],
)
async def test_ids_no_event_could_carry_are_refused_never_a_500(
    api: Api, method: str, path: str, expected: tuple[int, str]
) -> None:
    # PostgreSQL text cannot hold a NUL: such an id is refused before any query
    reply = await asyncio.to_thread(http, api.url + path, method=method, token=ADMIN)
    assert (reply.status, reply.json()["error"]) == expected


async def test_forced_disconnect_takes_effect_on_the_next_request(api: Api) -> None:
    # Given a user connected on two devices, with tokens in use
    await api.event("connected", "1", session_id="a")
    await api.event("connected", "1", session_id="b")
    assert (await api.get("/auth/check", token=mint("1", sid="a"))).status == 200
    # When an admin disconnects them
    reply = await api.post("/admin/users/1/disconnect", token=ADMIN)
    assert reply.status == 200
    body = reply.json()
    assert body["status"] == "disconnected"
    assert sorted(body["ended_sessions"]) == ["a", "b"]
    # Then the next request with any of their tokens is refused
    for token in (mint("1", sid="a"), mint("1", sid="b"), mint("1")):
        reply = await api.get("/auth/check", token=token)
        assert reply.status == 403
        assert reply.json()["reason"] in ("not_connected", "session_ended")
    rows = await conn().execute_query_dict(
        "SELECT kind, reason, source FROM audit_events WHERE user_id = '1'"
        " AND kind = 'forced_disconnect' ORDER BY id"
    )
    assert [(r["reason"], r["source"]) for r in rows] == [("admin", "admin")] * 2
    unknown = await api.post("/admin/users/nobody/disconnect", token=ADMIN)
    assert unknown.status == 404
    assert (await conn().execute_query_dict("SELECT 1 FROM users WHERE id = 'nobody'")) == []
