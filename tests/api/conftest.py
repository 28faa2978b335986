"""The API served for real on 127.0.0.1: in this process (injectable clock, direct state set-up)
or as ``sessiond api`` processes; requests go over TCP with urllib, never through a test client."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from typing import Any

import jwt
import pytest
from sanic import Sanic

from api.app import create_app
from api.context import App
from loadtests.harness import free_port
from sessiond.config import Settings
from sessiond.events import Event
from storage import db
from storage.cache import Cache
from storage.state import apply_event, publish_snapshot
from tests.conftest import truncate

SECRET = "test-secret-that-is-long-enough-for-hs256"


def mint(
    sub: str | None = "u1",
    *,
    sid: str | None = None,
    roles: list[str] | None = None,
    ttl: int | None = 300,
    key: Any = SECRET,
    algorithm: str = "HS256",
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    now = int(time.time())
    body: dict[str, Any] = {"iat": now}
    if ttl is not None:
        body["exp"] = now + ttl
    if sub is not None:
        body["sub"] = sub
    if sid is not None:
        body["sid"] = sid
    if roles is not None:
        body["roles"] = roles
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=algorithm, headers=headers)


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    url: str,
    *,
    method: str = "GET",
    token: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One blocking request; 4xx/5xx answers are returned, not raised."""
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, method=method, headers=all_headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return Reply(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return Reply(err.code, err.headers, err.read())


@dataclass
class FakeClock:
    """Epoch seconds; starts at real time, moves only when told to."""

    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class Api:
    """An in-process API on a free port."""

    app: App
    url: str
    clock: FakeClock
    cache: Cache
    settings: Settings
    _server: Any = field(default=None, repr=False)

    async def get(self, path: str, **kwargs: Any) -> Reply:
        return await asyncio.to_thread(http, self.url + path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Reply:
        return await asyncio.to_thread(http, self.url + path, method="POST", **kwargs)

    async def event(self, kind: str, user_id: str, **fields: Any) -> None:
        """Applies an auth event exactly as a partition worker would (PostgreSQL, then Redis)."""
        fields.setdefault("occurred_at", datetime.now(UTC))
        outcome = await apply_event(Event(kind=kind, user_id=user_id, **fields))  # type: ignore[arg-type]
        await publish_snapshot(self.cache, outcome)


async def start_api(settings: Settings, cache: Cache, clock: FakeClock | None = None) -> Api:
    clock = clock or FakeClock()
    app = create_app(settings, clock=clock)
    # Sanic's "touchup" rewrites its own HTTP class in place at start-up and cannot do it twice in
    # one process; the spawned APIs (tests/api/test_api_process.py) keep it on.
    app.config.TOUCHUP = False
    port = free_port()
    server: Any = await app.create_server(
        host="127.0.0.1", port=port, return_asyncio_server=True, access_log=False
    )
    assert server is not None
    await server.startup()
    await server.before_start()
    await server.after_start()
    return Api(app, f"http://127.0.0.1:{port}", clock, cache, settings, server)


STOP_STAGE_TIMEOUT_S = 60.0


async def stop_api(api: Api) -> None:
    """Each stage of the stop is bounded, so a hang fails this one test naming the stage,
    instead of the session timeout; and the app is unregistered and Tortoise closed whatever
    happened, so the tests after it can start their own API (one hang once failed 88)."""
    server = api._server
    try:
        for name, stage in (
            ("before_server_stop", server.before_stop),
            ("close", server.close),
            ("after_server_stop", server.after_stop),
        ):
            try:
                await asyncio.wait_for(stage(), STOP_STAGE_TIMEOUT_S)
            except TimeoutError:
                raise AssertionError(
                    f"in-process API: {name} did not finish within {STOP_STAGE_TIMEOUT_S:.0f} s"
                ) from None
    finally:
        Sanic.unregister_app(api.app)
        await db.close_db()  # after_server_stop's own close, when it did not get there


ApiFactory = Callable[..., Awaitable[Api]]


@pytest.fixture
async def api_factory(migrated: Settings, cache: Cache) -> AsyncIterator[ApiFactory]:
    """Starts in-process APIs with settings overrides; the databases start empty. Only one may
    run at a time (each opens the process-wide Tortoise context)."""
    await truncate(migrated)
    started: list[Api] = []

    async def start(clock: FakeClock | None = None, **overrides: Any) -> Api:
        settings = migrated.model_copy(update=overrides) if overrides else migrated
        api = await start_api(settings, cache, clock)
        started.append(api)
        return api

    yield start
    for api in reversed(started):
        await stop_api(api)


@pytest.fixture
async def api(api_factory: ApiFactory) -> Api:
    return await api_factory()
