"""Block and unblock on the real stack: a block ends every session (reason ``blocked``, events
out), sets the fence, makes later logins no-ops journaled ``refused_blocked`` and answers 403
``blocked`` until unblocked."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis

from storage import block
from tests.api.conftest import Api, ApiFactory, mint

pytestmark = pytest.mark.integration
ADMIN = mint("root", roles=["admin"], ttl=86_400)  # minted at collection: outlives the suite


@pytest.fixture
async def bapi(pg: asyncpg.Connection, redis: aioredis.Redis, api_factory: ApiFactory) -> Api:
    api = await api_factory()
    await api.event("connected", "u1", session_id="a")
    await api.event("connected", "u1", session_id="b")
    return api


async def reason(api: Api, token: str) -> tuple[int, str | None]:
    reply = await api.get("/auth/check", token=token)
    return reply.status, (reply.json().get("reason") if reply.body else None)


def later(seconds: float = 1.0) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def test_block_ends_every_session_and_refuses_later_logins(
    bapi: Api, pg: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    # When an administrator blocks u1
    reply = await bapi.post("/admin/users/u1/block", token=ADMIN)
    assert reply.status == 200
    body = reply.json()
    assert (body["blocked"], body["status"], sorted(body["ended_sessions"])) == (
        True, "disconnected", ["a", "b"],
    )  # fmt: skip

    # Then every token of u1 is 403 blocked (from Redis alone, and from PostgreSQL too)
    for sid in ("a", "b", None):
        assert await reason(bapi, mint("u1", sid=sid)) == (403, "blocked")
    rows = await pg.fetch("SELECT session_id, end_reason FROM sessions WHERE session_id <> ''")
    assert sorted(tuple(r) for r in rows) == [("a", "blocked"), ("b", "blocked")]
    outbox = [tuple(r) for r in await pg.fetch("SELECT type, reason FROM outbox ORDER BY id")]
    assert outbox[-3:] == [
        ("session.ended", "blocked"), ("session.ended", "blocked"),
        ("user.disconnected", "blocked"),
    ]  # fmt: skip
    assert await pg.fetchval("SELECT count(*) FROM audit_events WHERE kind = 'blocked'") == 1

    # And a later login is a no-op, journaled refused_blocked
    await bapi.event("connected", "u1", session_id="c", occurred_at=later())
    assert await reason(bapi, mint("u1", sid="c")) == (403, "blocked")
    refused = await pg.fetchval(
        "SELECT count(*) FROM audit_events WHERE kind = 'ignored' AND reason = 'refused_blocked'"
    )
    assert refused == 1
    assert await pg.fetchval("SELECT status FROM users WHERE id = 'u1'") == "disconnected"
    # And with Redis emptied, PostgreSQL still says blocked
    await redis.flushdb()
    assert await reason(bapi, mint("u1")) == (403, "blocked")


async def test_unblock_lets_the_user_log_in_again_with_old_tokens_fenced(
    bapi: Api, redis: aioredis.Redis
) -> None:
    old = mint("u1", iat=int(time.time()) - 120)
    assert (await bapi.post("/admin/users/u1/block", token=ADMIN)).status == 200
    assert await redis.exists(block.blocked_key("u1"))

    reply = await bapi.post("/admin/users/u1/unblock", token=ADMIN)
    assert (reply.status, reply.json()["blocked"]) == (200, False)
    assert not await redis.exists(block.blocked_key("u1"))
    assert await reason(bapi, mint("u1")) == (403, "not_connected")

    await bapi.event("connected", "u1", session_id="c", occurred_at=later())
    assert await reason(bapi, mint("u1", sid="c")) == (200, None)
    assert await reason(bapi, old) == (401, "revoked")


async def test_a_user_never_seen_can_be_blocked_before_the_first_login(bapi: Api) -> None:
    assert (await bapi.post("/admin/users/newcomer/block", token=ADMIN)).status == 200
    await bapi.event("connected", "newcomer", occurred_at=later())
    assert await reason(bapi, mint("newcomer")) == (403, "blocked")


async def test_only_admins_block(bapi: Api) -> None:
    reply = await bapi.post("/admin/users/u1/block", token=mint("u1"))
    assert (reply.status, reply.json()["reason"]) == (403, "missing_role")
    assert await reason(bapi, mint("u1", sid="a")) == (200, None)
    assert (await bapi.post("/admin/users/nobody/unblock", token=ADMIN)).status == 404


async def test_keycloak_enable_does_not_lift_an_administrators_block(
    bapi: Api, pg: asyncpg.Connection
) -> None:
    # Given Keycloak disabled u1, then an administrator blocked u1 as well
    await block.block_user("u1", reason="idp_user_disabled", source="keycloak")
    await block.block_user("u1", source="admin")
    assert await pg.fetchval("SELECT blocked_reason FROM users WHERE id = 'u1'") == "blocked"
    # When Keycloak enables u1 again: the administrator's block stays
    kept = await block.unblock_user("u1", source="keycloak", only_reason="idp_user_disabled")
    assert (kept.applied, kept.reason) == (False, "not_blocked")
    assert await pg.fetchval("SELECT blocked_at IS NOT NULL FROM users WHERE id = 'u1'")
    # And a block of Keycloak's own is lifted by it
    await block.unblock_user("u1", source="admin")
    await block.block_user("u1", reason="idp_user_disabled", source="keycloak")
    lifted = await block.unblock_user("u1", source="keycloak", only_reason="idp_user_disabled")
    assert lifted.applied
    assert await pg.fetchval("SELECT blocked_at FROM users WHERE id = 'u1'") is None
