"""A first receipt counts only if its batch was committed, on the real stack: the ingress stores a
batch's receipts, then RabbitMQ closes its connection before the AMQP commit (the management
API, as an operator or a broker restart would), and the batch is read again."""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import asyncpg
import pytest
from dramatiq.asyncio import EventLoopThread

from actors import stamping, topology
from actors.ingress import Ingress
from actors.sources import auth_source
from sessiond import stack
from sessiond.config import Settings
from storage.receipts import Receipt, Settled
from tests.conftest import Amqp, wait_until
from tests.integration.test_event_receipts import apply, forwarded, status

pytestmark = pytest.mark.integration


class Management:
    """RabbitMQ's management API on this stack's port."""

    def __init__(self, cfg: stack.StackConfig, settings: Settings) -> None:
        self.base = f"http://127.0.0.1:{cfg.mgmt_port}/api"
        self.vhost = quote(unquote(urlsplit(settings.amqp_urls[0]).path.lstrip("/")), safe="")
        auth = base64.b64encode(f"{stack.USER}:{stack.PASSWORD}".encode()).decode()
        self.headers = {"Authorization": f"Basic {auth}"}

    def call(self, method: str, path: str) -> Any:
        req = urllib.request.Request(  # noqa: S310 - 127.0.0.1
            f"{self.base}/{path}", method=method, headers=self.headers
        )
        with urllib.request.urlopen(req, timeout=10) as reply:  # noqa: S310 - 127.0.0.1
            raw = reply.read()
        return json.loads(raw) if raw else None

    def opened_since(self, since: float) -> str:
        """The one connection opened after ``since`` (epoch seconds): the ingress's, while the
        test opens none. The API lists a connection some seconds after it opened (statistics)."""
        found: list[str] = []

        def listed() -> bool:
            found[:] = [
                c["name"]
                for c in self.call("GET", f"vhosts/{self.vhost}/connections")
                if c["connected_at"] / 1000 >= since
            ]
            return bool(found)

        wait_until(listed, timeout=20)
        assert len(found) == 1, found
        return found[0]

    def close(self, connection: str) -> None:
        """Has the broker close it. The broker discards every later frame of a connection it is
        closing but the client's close-ok (which this client sends only once it reads again):
        the moment given here lets the DELETE reach the connection before its next frame."""
        self.call("DELETE", f"connections/{quote(connection, safe='')}")
        time.sleep(0.5)


def breaking_after_first_store(
    remember: stamping.Remember,
    mgmt: Management,
    failed: list[dict[str, Receipt]],
    then: Callable[[], None],
) -> stamping.Remember:
    """``remember``, and after its first call (the receipts are stored) the connection of the
    ingress (started after this) is closed: the batch's AMQP commit fails; then ``then``."""
    since = time.time()  # before the ingress connects

    def wrapped(batch: list[Receipt], settled: Callable[[str], Settled]) -> dict[str, Receipt]:
        stored = remember(batch, settled)
        if not failed:
            mgmt.close(mgmt.opened_since(since))
            then()
            failed.append(stored)  # only now: neither step raised
        return stored

    return wrapped


def one_message_per_batch(ingress: Ingress) -> None:
    """Cuts the redelivery otherwise than the failed attempt (as a backlog or another consumer's
    timing may): each message is a batch, committed before the next one is stamped."""
    forward = ingress._forward

    def each(ch: Any, batch: list[Any]) -> None:
        for delivery in batch:
            forward(ch, [delivery])

    ingress._forward = each  # type: ignore[method-assign]


def take(settings: Settings, n: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []

    def there() -> bool:
        got.extend(forwarded(settings))
        return len(got) >= n

    wait_until(there, timeout=30)
    assert len(got) == n
    return got


def at(item: dict[str, Any], field: str = "received_at") -> datetime:
    return datetime.fromisoformat(item[field])


@pytest.mark.parametrize("hand_over", [False, True], ids=["reconnect", "hand-over"])
async def test_a_failed_commit_leaves_no_first_receipt(
    hand_over: bool,
    broker_client: Amqp,
    settings: Settings,
    stack_config: stack.StackConfig,
    storage_loop: EventLoopThread,
    raw_pg: asyncpg.Connection,
) -> None:
    remember = stamping.on_loop(storage_loop.run_coroutine)
    mgmt = Management(stack_config, settings)
    queue = settings.ingest_queue
    # Given an event with an event_id forwarded and committed (a stored receipt, a high-water)
    warm = {"event": "connected", "user_id": "warm", "event_id": "warm-1"}
    first = Ingress(settings, [auth_source(settings)], remember)
    first.start()
    try:
        broker_client.publish(warm)
        [committed] = take(settings, 1)
    finally:
        first.stop()
    # ... and one user's login without an event_id, then its logout with one, in one batch
    user = "failed-commit"
    login = {"event": "connected", "user_id": user, "event_id": None}
    logout = {"event": "disconnected", "user_id": user, "event_id": f"{user}-2"}
    broker_client.publish_many([login, logout])
    failed: list[dict[str, Receipt]] = []
    failing = Ingress(settings, [auth_source(settings)], remember)
    # Read again by the same ingress reconnecting, or by another one taking over (this one
    # stops); either cuts the batch apart: the login is committed before the logout is stamped
    failing.remember = breaking_after_first_store(
        remember,
        mgmt,
        failed,
        failing.stopping.set if hand_over else lambda: one_message_per_batch(failing),
    )
    failing.start()
    ingress = failing
    try:
        # When its receipts are stored and the commit then fails (the connection closed)
        wait_until(lambda: bool(failed), timeout=30)
        [(key, attempt)] = failed[0].items()
        if hand_over:
            failing.join(10)
            assert not failing.is_alive()
            ingress = Ingress(settings, [auth_source(settings)], remember)
            one_message_per_batch(ingress)
            ingress.start()
        # Then the batch is read again and forwarded once, in publish order
        items = take(settings, 2)
        # ... and a copy of the committed event still gets its first stamps
        broker_client.publish(warm)
        [copy] = take(settings, 1)
    finally:
        failing.stop()
        ingress.stop()
        broker_client.purge(topology.stamp_queue(queue))
    by_kind = {item["event"]["kind"]: item for item in items}
    got_login, got_logout = by_kind["connected"], by_kind["disconnected"]
    # ... the logout not with the stamps of the attempt that was never forwarded
    assert at(got_logout) > attempt.received_at
    assert at(got_login) < at(got_logout)
    assert at(got_login["event"], "occurred_at") < at(got_logout["event"], "occurred_at")
    # ... so the user ends as published: disconnected
    for item in items:
        assert apply(storage_loop, item).applied
    assert await status(raw_pg, user) == "disconnected"
    # ... and the stored receipt is what the logout was forwarded with
    row = await raw_pg.fetchrow(
        "SELECT received_at, stamped_at FROM event_receipts WHERE key = $1", key
    )
    assert row is not None
    assert (row["received_at"], row["stamped_at"]) == (
        at(got_logout),
        at(got_logout, "stamped_at"),
    )
    for field in ("received_at", "stamped_at"):
        assert copy[field] == committed[field], field
    # Each of the login, the logout and the copy forwarded once, whoever did it: the failing
    # ingress may have committed the login alone before the logout reached it (a loaded machine
    # splits the two deliveries into two batches), and then only the logout's batch failed
    if hand_over:
        assert failing.forwarded in (0, 1)  # nothing of the failed batch; maybe the login
        assert failing.forwarded + ingress.forwarded == 3
    else:
        assert failing.forwarded == 3
