"""The active-user decision: cache-aside, sessions, idle timeout, activity and access journaling."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest

from storage.activity import ACCESS_LOG_KEY, ACTIVITY_KEY, REFUSED_KEY, SESSION_ACTIVITY_KEY
from storage.cache import user_key
from storage.keys import session_field
from tests.api.conftest import Api, mint

pytestmark = pytest.mark.integration


def assert_forbidden(reply: object, reason: str) -> None:
    status, body = reply.status, reply.json()  # type: ignore[attr-defined]
    assert (status, body) == (403, {"error": "forbidden", "reason": reason})


async def test_connected_user_is_granted_then_refused_after_disconnect(api: Api) -> None:
    # Given a connected user
    await api.event("connected", "42", name="John Doe", email="john@example.com")
    assert (await api.get("/auth/check", token=mint("42"))).status == 200
    # When the auth service says they disconnected
    await api.event("disconnected", "42")
    # Then the very next request is refused, and the cache key is gone
    assert_forbidden(await api.get("/auth/check", token=mint("42")), "not_connected")
    assert await api.cache.client.exists(user_key("42")) == 0


async def test_unknown_user_is_not_connected(api: Api) -> None:
    assert_forbidden(await api.get("/auth/check", token=mint("nobody")), "not_connected")
    assert_forbidden(await api.get("/api/me", token=mint("nobody")), "not_connected")


async def test_cache_flushed_falls_back_to_postgres_and_refills(api: Api) -> None:
    # Given a connected user whose cache entry is lost (Redis flushed)
    await api.event("connected", "7", email="seven@example.com")
    await api.cache.client.flushdb()
    # When they call
    reply = await api.get("/auth/check", token=mint("7"))
    # Then PostgreSQL answers and the key is back, with the cache TTL
    assert reply.status == 200
    assert reply.headers["X-User-Email"] == "seven@example.com"
    cached = await api.cache.get("7")
    assert cached is not None and cached.connected
    ttl = await api.cache.client.ttl(user_key("7"))
    assert 0 < ttl <= api.settings.cache_ttl_s
    assert api.app.ctx.metrics.cache.get("miss") >= 1


async def test_refill_never_resurrects_a_disconnected_user(api: Api) -> None:
    await api.event("connected", "8")
    await api.event("disconnected", "8")
    await api.cache.client.flushdb()
    assert_forbidden(await api.get("/auth/check", token=mint("8")), "not_connected")
    assert await api.cache.client.exists(user_key("8")) == 0


async def test_token_for_an_ended_session_stays_refused(api: Api) -> None:
    # Given a user logged in on a laptop, whose laptop session then ends
    await api.event("connected", "9", session_id="laptop")
    laptop = mint("9", sid="laptop")
    reply = await api.get("/auth/check", token=laptop)
    assert reply.status == 200 and reply.headers["X-Session-Id"] == "laptop"
    await api.event("disconnected", "9", session_id="laptop")
    assert_forbidden(await api.get("/auth/check", token=laptop), "not_connected")
    # When the same user logs in on a phone
    await api.event("connected", "9", session_id="phone")
    # Then the phone's token passes and the laptop's old token stays refused
    assert (await api.get("/auth/check", token=mint("9", sid="phone"))).status == 200
    assert_forbidden(await api.get("/auth/check", token=laptop), "session_ended")
    # and a token without sid only needs the user to be connected
    assert (await api.get("/auth/check", token=mint("9"))).status == 200


async def test_idle_beyond_timeout_is_refused(api: Api) -> None:
    # Given a connected user who has not been seen for longer than the idle timeout
    await api.event("connected", "10")
    assert (await api.get("/auth/check", token=mint("10"))).status == 200
    await api.app.ctx.recorder.flush()
    await api.cache.client.hdel(ACTIVITY_KEY, "10")  # as if nothing was pending
    await api.cache.client.hdel(SESSION_ACTIVITY_KEY, session_field("10", ""))
    api.clock.advance(api.settings.idle_timeout_s + 5)
    # When they call again, before any expiry sweep ran
    reply = await api.get("/auth/check", token=mint("10"))
    # Then the API refuses on its own
    assert_forbidden(reply, "idle_timeout")


async def test_pending_activity_keeps_the_user_alive(api: Api) -> None:
    # Given a user whose cached times are old but whose activity is pending in Redis
    await api.event("connected", "11")
    api.clock.advance(api.settings.idle_timeout_s - 10)
    assert (await api.get("/auth/check", token=mint("11"))).status == 200
    await api.app.ctx.recorder.flush()
    assert await api.cache.client.hget(ACTIVITY_KEY, "11") is not None
    # When time moves on by less than the timeout since that activity
    api.clock.advance(60)
    # Then the user is still active (cache says idle, the activity buffer says not)
    assert (await api.get("/auth/check", token=mint("11"))).status == 200


async def test_grants_record_activity_and_every_decision_is_journaled(api: Api) -> None:
    await api.event("connected", "12")
    await api.get("/auth/check", token=mint("12", sid=None))
    await api.get("/auth/check", token=mint("12", sid="gone"))
    await api.get("/auth/check", token="garbage")
    await api.app.ctx.recorder.flush()
    raw = await api.cache.client.hget(ACTIVITY_KEY, "12")
    assert raw is not None
    seen = float(raw)
    assert abs(seen - api.clock()) < 5
    entries = [json.loads(e) for e in await api.cache.client.lrange(ACCESS_LOG_KEY, 0, -1)]
    summary = [(e["user_id"], e["session_id"], e["decision"], e["reason"]) for e in entries]
    assert summary == [
        ("12", None, "granted", None),
        ("12", "gone", "forbidden", "session_ended"),
    ]
    for entry in entries:
        assert entry["route"] == "/auth/check"
        assert datetime.fromisoformat(entry["at"]) > datetime.now(UTC) - timedelta(minutes=1)
    # A refused token is counted per (minute, route, reason, client address), not stored
    refused = await api.cache.client.hgetall(REFUSED_KEY)
    assert len(refused) == 1
    [(field, count)] = refused.items()
    minute, route, reason, client = json.loads(field)
    assert (route, reason, client, int(count)) == ("/auth/check", "malformed", "127.0.0.1", 1)
    assert minute % 60 == 0 and abs(minute - api.clock()) < 120


async def test_no_postgres_write_per_request(api: Api) -> None:
    # Given a connected user and the audit journal as it stands
    await api.event("connected", "13")
    from storage.db import conn

    async def counts() -> tuple[int, object]:
        rows = await conn().execute_query_dict(
            "SELECT (SELECT count(*) FROM audit_events) AS n,"
            " (SELECT last_activity_at FROM users WHERE id = '13') AS last"
        )
        return rows[0]["n"], rows[0]["last"]

    before = await counts()
    # When many requests are granted
    for _ in range(20):
        assert (await api.get("/auth/check", token=mint("13"))).status == 200
    await api.app.ctx.recorder.flush()
    # Then PostgreSQL is untouched: activity and decisions wait in Redis for the flush job
    assert await counts() == before
    assert await api.cache.client.llen(ACCESS_LOG_KEY) == 20


async def test_me(api: Api) -> None:
    await api.event("connected", "14", name="Ann", email="ann@example.com")
    reply = await api.get("/api/me", token=mint("14"))
    assert reply.status == 200
    body = reply.json()
    assert body == {
        "user_id": "14",
        "name": "Ann",
        "email": "ann@example.com",
        "status": "connected",
        "last_activity_at": None,
    }
    await api.app.ctx.recorder.flush()
    again = (await api.get("/api/me", token=mint("14"))).json()
    assert again["last_activity_at"] is not None


async def test_identity_headers_are_header_safe(api: Api) -> None:
    await api.event("connected", "15", email="zoë@exämple.com")
    reply = await api.get("/auth/check", token=mint("15"))
    assert reply.status == 200
    assert reply.headers["X-User-Email"] == "zo%C3%AB@ex%C3%A4mple.com"


async def test_concurrent_requests_of_many_users_each_get_their_own_answer(api: Api) -> None:
    # Given connected, disconnected and unknown users
    for uid in ("c1", "c2", "c3"):
        await api.event("connected", uid, email=f"{uid}@example.com")
    await api.event("connected", "d1")
    await api.event("disconnected", "d1")
    users = ["c1", "c2", "c3", "d1", "x1"] * 8
    # When their requests arrive together (Redis reads are coalesced into shared MGETs)
    replies = await asyncio.gather(*(api.get("/auth/check", token=mint(u)) for u in users))
    # Then each answer is the one for that user
    for uid, reply in zip(users, replies, strict=True):
        if uid.startswith("c"):
            assert reply.status == 200 and reply.headers["X-User-Email"] == f"{uid}@example.com"
        else:
            assert_forbidden(reply, "not_connected")


async def test_identity_headers_are_always_all_three(api: Api) -> None:
    # Given a user without e-mail, and a token without sid
    await api.event("connected", "16")
    reply = await api.get("/auth/check", token=mint("16"))
    # Then all three headers are there, the unknown ones empty (a proxy copying them always
    # overwrites the client's own)
    assert reply.status == 200
    assert reply.headers.get("X-User-Id") == "16"
    assert reply.headers.get("X-User-Email") == ""
    assert reply.headers.get("X-Session-Id") == ""


async def test_identity_headers_are_injective(api: Api) -> None:
    # Given two users whose ids differ only in being percent-encoded already
    await api.event("connected", "café", session_id="s%1")
    await api.event("connected", "caf%C3%A9", session_id="s 1")
    one = await api.get("/auth/check", token=mint("café", sid="s%1"))
    two = await api.get("/auth/check", token=mint("caf%C3%A9", sid="s 1"))
    # Then their headers differ, "%" itself encoded
    assert (one.headers["X-User-Id"], one.headers["X-Session-Id"]) == ("caf%C3%A9", "s%251")
    assert (two.headers["X-User-Id"], two.headers["X-Session-Id"]) == ("caf%25C3%25A9", "s%201")
