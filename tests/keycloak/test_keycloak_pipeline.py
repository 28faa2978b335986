"""Keycloak's RabbitMQ event-listener plugin, end to end on real servers: messages of exactly the
plugin's shape (pretty-printed JSON, ``application/json``, not persistent) published with pika to
``amq.topic`` → sessiond's own ``sessiond.keycloak`` queue → ingress → partition actors →
PostgreSQL + Redis → lifecycle events out, with ``sessiond worker`` processes."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pika
import pytest
import redis.asyncio as aioredis

from actors import deadletter
from loadtests.keycloak_plugin import CLIENT_TIME_MS as TIME_MS
from loadtests.keycloak_plugin import EXCHANGE
from loadtests.keycloak_plugin import client_message as plugin_message
from sessiond import amqp
from sessiond.config import Settings
from tests.conftest import Amqp, Process, async_wait_until, cache_entry_when, wait_until
from tests.outbox.support import EventsOut

pytestmark = pytest.mark.integration

QUEUE = Settings.model_fields["keycloak_queue"].default


@pytest.fixture(scope="module")
def worker(
    migrated: Settings, test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Process]:
    """Two worker processes configured for Keycloak by settings alone."""
    log = tmp_path_factory.mktemp("kc-worker") / "worker.log"
    argv = [sys.executable, "-m", "sessiond.cli", "worker", "--processes", "2", "--threads", "2"]
    env = {
        **test_env,
        "SESSIOND_KEYCLOAK_EXCHANGE": EXCHANGE,
        "SESSIOND_KEYCLOAK_ROUTING_KEYS": "KK.EVENT.CLIENT.#",
        "SESSIOND_OUTBOX_POLL_S": "0.1",
        "SESSIOND_LOG_LEVEL": "INFO",
    }
    proc = Process(argv, env, log)
    yield proc
    assert proc.alive(), f"worker died:\n{proc.output()[-3000:]}"
    assert proc.stop() == 0, proc.output()[-3000:]


class Keycloak:
    """Publishes as the plugin does: ``amq.topic``, pretty JSON, transient, no confirms."""

    def __init__(self, settings: Settings) -> None:
        self.conn = pika.BlockingConnection(amqp.connection_parameters(settings))
        self.ch = self.conn.channel()

    def send(self, body: dict[str, Any] | bytes, *, result: str = "SUCCESS") -> None:
        event_type = body.get("type", "LOGIN") if isinstance(body, dict) else "LOGIN"
        key = f"KK.EVENT.CLIENT.myrealm.{result}.web.{event_type}"
        data = json.dumps(body, indent=2).encode() if isinstance(body, dict) else body
        self.ch.basic_publish(
            EXCHANGE, key, data, pika.BasicProperties(content_type="application/json")
        )

    def queue_ready(self) -> bool:
        """sessiond's queue exists, is bound and consumed (the worker finished booting)."""
        try:
            ok = self.ch.queue_declare(QUEUE, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            self.ch = self.conn.channel()
            return False
        return bool(ok.method.consumer_count)

    def close(self) -> None:
        if self.conn.is_open:
            self.conn.close()


@pytest.fixture
def keycloak(worker: Process, settings: Settings, broker_client: Amqp) -> Iterator[Keycloak]:
    kc = Keycloak(settings)
    wait_until(kc.queue_ready, timeout=60)
    kc.ch.queue_purge(QUEUE)
    try:
        yield kc
    finally:
        kc.close()


async def status_of(pg: asyncpg.Connection, user_id: str) -> str | None:
    value = await pg.fetchval("SELECT status FROM users WHERE id = $1", user_id)
    return None if value is None else str(value)


async def _is(pg: asyncpg.Connection, user_id: str, status: str) -> bool:
    return await status_of(pg, user_id) == status


async def test_login_then_logout_end_to_end(
    keycloak: Keycloak,
    pg: asyncpg.Connection,
    redis: aioredis.Redis,
    events_out: EventsOut,
) -> None:
    user, sid = f"8d2f-{uuid.uuid4()}", f"b71e-{uuid.uuid4()}"
    # Given the plugin's LOGIN message
    keycloak.send(plugin_message("LOGIN", user, sid))

    # Then session sid of the user started at the event's time, with its device data
    await async_wait_until(lambda: _is(pg, user, "connected"))
    row = await pg.fetchrow("SELECT * FROM sessions WHERE user_id = $1", user)
    assert row is not None
    assert (row["session_id"], row["status"], row["ip_address"], row["source"]) == (
        sid, "connected", "10.0.0.7", "keycloak",
    )  # fmt: skip
    assert row["started_at"] == datetime.fromtimestamp(TIME_MS / 1000, tz=UTC)
    assert await pg.fetchval("SELECT name FROM users WHERE id = $1", user) == "john"
    cached = await cache_entry_when(redis, user, lambda e: e is not None)
    assert cached is not None and cached["sessions"] == [sid]
    # And session.started went out
    wait_until(lambda: events_out.of(user) == [("session.started", sid, None)])

    # When the plugin's LOGOUT follows
    keycloak.send(plugin_message("LOGOUT", user, sid, time=TIME_MS + 60_000))

    # Then the session ended, the user is disconnected and evicted, and both events went out
    await async_wait_until(lambda: _is(pg, user, "disconnected"))
    assert await cache_entry_when(redis, user, lambda e: e is None) is None
    wait_until(
        lambda: (
            events_out.of(user)
            == [
                ("session.started", sid, None),
                ("session.ended", sid, "logout"),
                ("user.disconnected", None, "logout"),
            ]
        )
    )


async def test_other_types_and_errors_change_nothing(
    keycloak: Keycloak, pg: asyncpg.Connection, settings: Settings, broker_client: Amqp
) -> None:
    # Given events sessiond ignores: other types, a failed LOGIN (ERROR result) and one carrying
    # an error field; then a successful LOGIN as a marker
    keycloak.send(plugin_message("CODE_TO_TOKEN", "u-token", "s1"))
    keycloak.send(plugin_message("REFRESH_TOKEN", "u-token", "s1"))
    keycloak.send(plugin_message("LOGIN", "u-error", "s2", error="invalid_user_credentials"))
    keycloak.send(plugin_message("LOGIN", "u-error-key", "s3"), result="ERROR")
    keycloak.send(plugin_message("LOGIN", "u-marker", "s4"))
    await async_wait_until(lambda: _is(pg, "u-marker", "connected"))

    # Then only the marker did anything: no other user, no dead letter
    assert [r["id"] for r in await pg.fetch("SELECT id FROM users")] == ["u-marker"]
    assert await pg.fetchval("SELECT count(*) FROM processed_events") == 1
    assert broker_client.depth(settings.dead_letter_queue) == 0
    assert keycloak.ch.queue_declare(QUEUE, passive=True).method.message_count == 0


async def test_redelivered_login_is_a_no_op(
    keycloak: Keycloak, pg: asyncpg.Connection, events_out: EventsOut
) -> None:
    message = plugin_message("LOGIN", "u-dup", "s1")
    keycloak.send(message)
    keycloak.send(message)
    await async_wait_until(
        lambda: pg.fetchval(
            "SELECT count(*) FROM audit_events WHERE user_id = 'u-dup' AND reason = 'duplicate'"
        )
    )
    wait_until(lambda: events_out.of("u-dup") == [("session.started", "s1", None)])
    assert await pg.fetchval("SELECT count(*) FROM sessions WHERE user_id = 'u-dup'") == 1


async def test_invalid_messages_are_dead_lettered_with_reason(
    keycloak: Keycloak, pg: asyncpg.Connection, settings: Settings, broker_client: Amqp
) -> None:
    keycloak.send(b"{not json")
    keycloak.send(plugin_message("LOGIN", "", "s1"))
    keycloak.send(plugin_message("LOGOUT", "u-nosid", "s1", sessionId=None))
    wait_until(lambda: broker_client.depth(settings.dead_letter_queue) >= 3)
    letters = list(deadletter.listing(settings, limit=10))
    assert sorted(letter.reason for letter in letters) == [
        "missing_session_id", "missing_user_id", "not_json",
    ]  # fmt: skip
    assert {letter.source_queue for letter in letters} == {QUEUE}
    assert {letter.exchange for letter in letters} == {EXCHANGE}
    assert letters[0].routing_key.startswith("KK.EVENT.CLIENT.myrealm.SUCCESS.web.")
    await async_wait_until(
        lambda: pg.fetchval("SELECT count(*) FROM audit_events WHERE kind = 'dead_lettered'")
    )


async def test_a_poison_time_stops_nothing(
    keycloak: Keycloak,
    pg: asyncpg.Connection,
    settings: Settings,
    broker_client: Amqp,
    worker: Process,
) -> None:
    # Scenario 4 of issue 11: a LOGIN whose `time` is a 400-digit integer (OverflowError once
    # divided), followed by events of both sources, logouts included
    poison = json.dumps(plugin_message("LOGIN", "u-poison", "s1", time=0)).replace(
        '"time": 0', '"time": 1' + "0" * 399
    )
    keycloak.send(poison.encode())
    keycloak.send(plugin_message("LOGIN", "u-after-poison", "s1"))
    keycloak.send(plugin_message("LOGOUT", "u-after-poison", "s1", time=TIME_MS + 1000))
    broker_client.publish({"event": "connected", "user_id": "auth-after-poison"})
    # Then the poison alone is dead-lettered, with a reason, and everything else is applied
    wait_until(lambda: broker_client.depth(settings.dead_letter_queue) >= 1)
    [letter] = list(deadletter.listing(settings, limit=10))
    assert (letter.reason, letter.source_queue) == ("invalid_occurred_at", QUEUE)
    await async_wait_until(lambda: _is(pg, "u-after-poison", "disconnected"))
    await async_wait_until(lambda: _is(pg, "auth-after-poison", "connected"))
    assert await status_of(pg, "u-poison") is None
    assert "ingress failed" not in worker.output()
