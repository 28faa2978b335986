"""Keycloak admin events end to end on real servers, with the default bindings: the plugin's exact
shapes (``loadtests/keycloak_plugin.py``) published with pika to ``amq.topic`` → sessiond's
``sessiond.keycloak`` queue → ingress → partition actors (owner lookup) → PostgreSQL + Redis →
the in-process API refuses the revoked tokens; lifecycle events go out with the new reasons."""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pika
import pytest
import redis.asyncio as aioredis

from actors import deadletter
from loadtests import keycloak_plugin as kc
from sessiond.config import Settings
from storage.activity import ACTIVITY_KEY, SESSION_ACTIVITY_KEY
from storage.keys import session_field
from tests.api.conftest import Api, ApiFactory, api_factory, mint
from tests.conftest import Amqp, Process, async_wait_until, wait_until
from tests.keycloak.test_keycloak_pipeline import QUEUE
from tests.outbox.support import EventsOut

log = logging.getLogger(__name__)
pytestmark = pytest.mark.integration
__all__ = ["api_factory"]  # the in-process API's fixture, shared with tests/api


@pytest.fixture(scope="module")
def worker(
    migrated: Settings, test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Process]:
    """Worker processes with Keycloak input on and the DEFAULT routing keys (admin included)."""
    log = tmp_path_factory.mktemp("kc-admin-worker") / "worker.log"
    argv = [sys.executable, "-m", "sessiond.cli", "worker", "--processes", "2", "--threads", "2"]
    env = {
        **test_env,
        "SESSIOND_KEYCLOAK_EXCHANGE": kc.EXCHANGE,
        "SESSIOND_KEYCLOAK_ACTIVITY_EVENTS": "REFRESH_TOKEN,CODE_TO_TOKEN",
        "SESSIOND_OUTBOX_POLL_S": "0.1",
    }
    env.pop("SESSIOND_KEYCLOAK_ROUTING_KEYS", None)
    proc = Process(argv, env, log)
    yield proc
    assert proc.alive(), f"worker died:\n{proc.output()[-3000:]}"
    assert proc.stop() == 0, proc.output()[-3000:]


class Plugin(kc.Plugin):
    """The plugin's publisher, and whether sessiond's queue is consumed yet."""

    def consumed(self) -> bool:
        try:
            ok = self.ch.queue_declare(QUEUE, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            self.ch = self.conn.channel()
            return False
        return bool(ok.method.consumer_count)


@pytest.fixture
async def api(api_factory: ApiFactory) -> Api:
    return await api_factory()


@pytest.fixture
def plugin(worker: Process, settings: Settings, api: Api) -> Iterator[Plugin]:
    kc_client = Plugin(settings)
    wait_until(kc_client.consumed, timeout=60)
    kc_client.ch.queue_purge(QUEUE)
    try:
        yield kc_client
    finally:
        kc_client.close()


async def sessions_of(pg: asyncpg.Connection, user: str) -> dict[str, tuple[str, str | None]]:
    """The user's named sessions (not the implicit one's ordering tombstone)."""
    rows = await pg.fetch(
        "SELECT session_id, status, end_reason FROM sessions"
        " WHERE user_id = $1 AND session_id <> ''",
        user,
    )
    return {r["session_id"]: (r["status"], r["end_reason"]) for r in rows}


async def login_two(plugin: Plugin, api: Api, pg: asyncpg.Connection) -> tuple[str, str, str]:
    """A user logged in on two devices, both granted."""
    user, s1, s2 = f"u-{uuid.uuid4()}", f"s1-{uuid.uuid4()}", f"s2-{uuid.uuid4()}"
    plugin.client("LOGIN", user, s1)
    plugin.client("LOGIN", user, s2)

    async def both_open() -> bool:
        return [v[0] for v in (await sessions_of(pg, user)).values()] == ["connected"] * 2

    await async_wait_until(both_open)
    for sid in (s1, s2):
        assert (await api.get("/auth/check", token=mint(user, sid=sid))).status == 200
    return user, s1, s2


async def until_refused(api: Api, token: str, timeout: float = 10.0) -> tuple[float, Any]:
    """Seconds until the token is refused, and the refusal's body."""
    started = time.monotonic()
    while True:
        reply = await api.get("/auth/check", token=token)
        if reply.status != 200:
            return time.monotonic() - started, reply.json()
        assert time.monotonic() - started < timeout, "still granted"


async def test_admin_session_delete_refuses_that_sid_and_keeps_the_other(
    plugin: Plugin, api: Api, pg: asyncpg.Connection, events_out: EventsOut
) -> None:
    # Given a user with two Keycloak sessions, both granted
    user, s1, s2 = await login_two(plugin, api, pg)

    # When an administrator signs session s1 out in the Keycloak console
    plugin.admin(kc.session_delete(s1))

    # Then s1 is refused soon (its owner was looked up by session id) while s2 stays granted
    took, body = await until_refused(api, mint(user, sid=s1))
    log.warning("admin session delete refused after %.1f ms", took * 1000)
    assert body == {"error": "forbidden", "reason": "session_ended"}
    assert (await api.get("/auth/check", token=mint(user, sid=s2))).status == 200
    assert took < 2.0, f"refused after {took:.3f}s"  # the 100 ms, with a loaded machine
    assert await sessions_of(pg, user) == {s1: ("ended", "idp_admin"), s2: ("connected", None)}
    wait_until(lambda: ("session.ended", s1, "idp_admin") in events_out.of(user))
    assert not any(e[0] == "user.disconnected" for e in events_out.of(user))


async def test_admin_user_logout_refuses_both_sessions(
    plugin: Plugin, api: Api, pg: asyncpg.Connection, events_out: EventsOut
) -> None:
    user, s1, s2 = await login_two(plugin, api, pg)
    plugin.admin(kc.user_logout(user))
    for sid in (s1, s2):
        _, body = await until_refused(api, mint(user, sid=sid))
        assert body["reason"] in ("not_connected", "session_ended")
    assert await sessions_of(pg, user) == {s1: ("ended", "idp_admin"), s2: ("ended", "idp_admin")}
    assert await pg.fetchval("SELECT status FROM users WHERE id = $1", user) == "disconnected"
    wait_until(lambda: ("user.disconnected", None, "idp_admin") in events_out.of(user))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (kc.user_delete, "idp_user_deleted"),
        (lambda u: kc.user_update(u, username="john", enabled=False), "idp_user_disabled"),
    ],
)
async def test_user_delete_and_disable_block_the_user(
    plugin: Plugin, api: Api, pg: asyncpg.Connection, make: Any, reason: str
) -> None:
    # Given a user on two devices; when Keycloak deletes or disables them
    user, s1, s2 = await login_two(plugin, api, pg)
    plugin.admin(make(user))

    # Then both sessions end with the reason, and the user is blocked
    _, body = await until_refused(api, mint(user))
    assert body == {"error": "forbidden", "reason": "blocked"}
    assert await sessions_of(pg, user) == {s1: ("ended", reason), s2: ("ended", reason)}
    assert await pg.fetchval("SELECT blocked_reason FROM users WHERE id = $1", user) == reason

    # And a later login is a no-op, journaled refused_blocked (not dead-lettered)
    plugin.client("LOGIN", user, "s3")

    async def refused() -> bool:
        return bool(
            await pg.fetchval(
                "SELECT count(*) FROM audit_events WHERE user_id = $1 AND reason = $2",
                user, "refused_blocked",
            )
        )  # fmt: skip

    await async_wait_until(refused)
    assert "s3" not in await sessions_of(pg, user)
    assert (await api.get("/auth/check", token=mint(user, sid="s3"))).json()["reason"] == "blocked"


async def test_user_enabled_again_can_log_in(
    plugin: Plugin, api: Api, pg: asyncpg.Connection
) -> None:
    user, _, _ = await login_two(plugin, api, pg)
    plugin.admin(kc.user_update(user, enabled=False))
    await until_refused(api, mint(user))
    plugin.admin(kc.user_update(user, enabled=True))

    async def unblocked() -> bool:
        return await pg.fetchval("SELECT blocked_at FROM users WHERE id = $1", user) is None

    await async_wait_until(unblocked)
    plugin.client("LOGIN", user, "s3", ago_s=0)  # after the disable (the fence) and the enable

    async def logged_in() -> bool:
        return (await sessions_of(pg, user)).get("s3") == ("connected", None)

    await async_wait_until(logged_in)
    assert (await api.get("/auth/check", token=mint(user, sid="s3"))).status == 200


async def test_user_update_that_keeps_the_user_enabled_changes_nothing(
    plugin: Plugin, api: Api, pg: asyncpg.Connection
) -> None:
    user, s1, _ = await login_two(plugin, api, pg)
    plugin.admin(kc.user_update(user, firstName="John", enabled=True))
    marker, marker_sid = f"m-{uuid.uuid4()}", "m1"
    plugin.client("LOGIN", marker, marker_sid)
    await async_wait_until(lambda: sessions_of(pg, marker))
    assert (await api.get("/auth/check", token=mint(user, sid=s1))).status == 200


async def test_realm_logout_all_logs_out_every_keycloak_user(
    plugin: Plugin, api: Api, pg: asyncpg.Connection
) -> None:
    # Given two Keycloak users and one user of the auth service
    first, _, _ = await login_two(plugin, api, pg)
    second, _, _ = await login_two(plugin, api, pg)
    await api.event("connected", "auth-user", session_id="a1")

    # When "Sign out all active sessions" of the realm
    plugin.admin(kc.logout_all())

    # Then both Keycloak users are out, the other source's user is not
    for user in (first, second):
        _, body = await until_refused(api, mint(user))
        assert body["reason"] == "not_connected"
    reasons = await pg.fetch(
        "SELECT DISTINCT end_reason FROM sessions"
        " WHERE user_id = ANY($1::text[]) AND session_id <> ''",
        [first, second],
    )
    assert [r["end_reason"] for r in reasons] == ["idp_admin"]
    assert (await api.get("/auth/check", token=mint("auth-user", sid="a1"))).status == 200


async def test_user_session_deleted_client_event_ends_the_session_as_expired(
    plugin: Plugin, api: Api, pg: asyncpg.Connection, events_out: EventsOut
) -> None:
    user, s1, s2 = await login_two(plugin, api, pg)
    plugin.client("USER_SESSION_DELETED", user, s1, ipAddress=None, details=None)
    await until_refused(api, mint(user, sid=s1))
    assert (await sessions_of(pg, user))[s1] == ("ended", "idp_expired")
    assert (await api.get("/auth/check", token=mint(user, sid=s2))).status == 200
    wait_until(lambda: ("session.ended", s1, "idp_expired") in events_out.of(user))


async def test_refresh_token_counts_as_activity(
    plugin: Plugin, api: Api, pg: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    user, s1, _ = await login_two(plugin, api, pg)
    await redis.hdel(ACTIVITY_KEY, user)
    await redis.hdel(SESSION_ACTIVITY_KEY, session_field(user, s1))
    plugin.client("REFRESH_TOKEN", user, s1)

    async def touched() -> bool:  # the user's activity, and that of the refreshed session
        return bool(await redis.hget(ACTIVITY_KEY, user)) and bool(
            await redis.hget(SESSION_ACTIVITY_KEY, session_field(user, s1))
        )

    await async_wait_until(touched)
    assert len(await sessions_of(pg, user)) == 2  # activity starts or ends nothing


async def test_malformed_admin_bodies_are_dead_lettered_with_a_reason(
    plugin: Plugin, api: Api, pg: asyncpg.Connection, settings: Settings, broker_client: Amqp
) -> None:
    key, body = kc.session_delete("s1")
    plugin.publish(key, {**body, "resourcePath": "sessions/"})
    plugin.publish(key, {**body, "operationType": "EXPLODE"})
    ukey, ubody = kc.user_update("u1")
    plugin.publish(ukey, {**ubody, "representation": "{not json"})
    wait_until(lambda: broker_client.depth(settings.dead_letter_queue) >= 3)
    letters = list(deadletter.listing(settings, limit=10))
    assert sorted(letter.reason for letter in letters) == [
        "invalid_operation_type", "invalid_representation", "invalid_resource_path",
    ]  # fmt: skip
    assert {letter.routing_key for letter in letters} == {key, ukey}
    assert {letter.source_queue for letter in letters} == {QUEUE}
