"""The clients of the system under test, and the recorder of what they did.

- ``Http``: a minimal HTTP/1.1 client on asyncio streams (one connection per request, a hard
  timeout), so that a request to an API whose Redis is paused is recorded as "no answer" instead
  of hanging the run.
- ``Publisher``: the auth service. One thread, one AMQP connection, publisher confirms, plain
  persistent JSON to the ``auth.events`` exchange (CONTRACT §1). One channel means the queue
  holds events in the order they were submitted, which is the order the model gives events
  without ``occurred_at``. A publish that fails (RabbitMQ restarting) is retried on a new
  connection; the first attempt may have landed too, so a retried event can arrive twice, next to
  itself: a duplicate, harmless by contract.
- ``Recorder``: every operation with its invocation and completion (``time.monotonic()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
import pika
import pika.exceptions

from sessiond import amqp
from sessiond.config import Settings
from tests.model.checker import Fault, Request
from tests.model.model import Op

log = logging.getLogger(__name__)

ROUTING_KEY = "auth.model"
HTTP_TIMEOUT_S = 5.0


def mint(secret: str, sub: str, *, sid: str | None = None, roles: list[str] | None = None) -> str:
    """A token as ``sessiond token`` makes it (HS256, ``iat``, one hour)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + 3600}
    if sid is not None:
        claims["sid"] = sid
    if roles:
        claims["roles"] = roles
    return jwt.encode(claims, secret, algorithm="HS256")


@dataclass(slots=True)
class Answer:
    status: int | None
    body: dict[str, Any]


class Http:
    def __init__(self, host: str, port: int, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s

    async def call(self, method: str, path: str, token: str | None = None) -> Answer:
        """``status`` None when the server did not answer within the timeout."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._call(method, path, token)
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError):
            return Answer(None, {})

    async def _call(self, method: str, path: str, token: str | None) -> Answer:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
            if token is not None:
                head.append(f"Authorization: Bearer {token}")
            if method != "GET":
                head.append("Content-Length: 0")
            head += ["Connection: close", "", ""]
            writer.write("\r\n".join(head).encode())
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        header, _, body = raw.partition(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        try:
            parsed = json.loads(body) if body.strip() else {}
        except ValueError:
            parsed = {"raw": body[:200].decode(errors="replace")}
        return Answer(status, parsed if isinstance(parsed, dict) else {"value": parsed})


@dataclass(slots=True)
class Recorder:
    """The history of one run; appended to from the event loop, read after it."""

    ops: list[Op] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    histories: int = 0
    seq: int = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


class Publisher(threading.Thread):
    """Publishes submitted bodies in order; sets each op's ``completed`` on the broker's ack."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="model-publisher", daemon=True)
        self.settings = settings
        self._queue: queue.Queue[tuple[bytes, list[Op]] | None] = queue.Queue()
        self._conn: pika.BlockingConnection | None = None
        self._channel: Any = None
        self.retries = 0
        self.published = 0

    def submit(self, body: dict[str, Any], ops: list[Op]) -> None:
        self._queue.put((json.dumps(body).encode(), ops))

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        self._queue.put(None)
        self.join(30)

    def _connect(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            self._close()
            self._conn = pika.BlockingConnection(amqp.connection_parameters(self.settings))
            channel = self._conn.channel()
            amqp.declare_topology(channel, self.settings)
            channel.confirm_delivery()
            self._channel = channel
        return self._channel

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            if self._conn is not None and self._conn.is_open:
                self._conn.close()
        self._conn, self._channel = None, None

    def run(self) -> None:
        while (item := self._queue.get()) is not None:
            body, ops = item
            while True:
                try:
                    self._connect().basic_publish(
                        self.settings.events_exchange,
                        ROUTING_KEY,
                        body,
                        pika.BasicProperties(delivery_mode=2, content_type="application/json"),
                        mandatory=True,
                    )
                    break
                except (pika.exceptions.AMQPError, OSError) as exc:
                    self.retries += 1
                    log.info("publish failed; retrying", extra={"error": repr(exc)[:200]})
                    self._close()
                    time.sleep(0.5)
            done = time.monotonic()
            for op in ops:
                op.completed = done
            self.published += 1
            self._queue.task_done()
        self._queue.task_done()
        self._close()
