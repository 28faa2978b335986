"""Envoy's ext_authz over gRPC: a client built from ``xds-protos`` (Envoy's own messages) gets
the decisions ``/auth/check`` gives, for the same tokens at the same moment."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtests.harness import free_port
from tests.api.conftest import Api, ApiFactory, mint
from tests.conftest import Process, async_wait_until, truncate
from tests.proxies.conftest import FORGED_ENVOY

pytestmark = pytest.mark.integration

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
OTHER_KEY = "another-secret-that-is-long-enough-for-hs256"


class Envoy:
    """What Envoy sends: the downstream request's headers, keys lower-cased."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    async def check(self, token: str | None, *, raw: bool = False) -> Any:
        headers = {":path": "/orders/7", ":method": "GET", **FORGED_ENVOY}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path="/orders/7")
        if raw:  # encode_raw_headers: true
            for key, value in headers.items():
                http.header_map.headers.add(key=key, raw_value=value.encode())
        else:
            http.headers.update(headers)
        request = external_auth_pb2.CheckRequest(
            attributes=attribute_context_pb2.AttributeContext(
                request=attribute_context_pb2.AttributeContext.Request(http=http)
            )
        )
        return await self.stub.Check(request, timeout=10)


@pytest.fixture
async def grpc_api(api_factory: ApiFactory) -> Api:
    return await api_factory(grpc_port=free_port())


@pytest.fixture
async def envoy(grpc_api: Api) -> AsyncIterator[Envoy]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_api.settings.grpc_port}") as channel:
        yield Envoy(channel)


def ok_headers(response: Any) -> dict[str, str]:
    assert response.status.code == code_pb2.OK, response
    assert response.HasField("ok_response")
    options = list(response.ok_response.headers)
    assert all(o.append_action == OVERWRITE and not o.HasField("append") for o in options)
    return {o.header.key: o.header.value for o in options}


async def assert_same(api: Api, envoy: Envoy, token: str | None) -> Any:
    """The gRPC answer matches ``/auth/check``'s for ``token``; returns the HTTP reply."""
    reply = await api.get("/auth/check", token=token)
    response = await envoy.check(token)
    if reply.status == 200:
        assert ok_headers(response) == {
            "x-user-id": reply.headers["X-User-Id"],
            "x-user-email": reply.headers["X-User-Email"],
            "x-session-id": reply.headers["X-Session-Id"],
        }
        return reply
    expected_code = {401: code_pb2.UNAUTHENTICATED, 403: code_pb2.PERMISSION_DENIED}
    assert response.status.code == expected_code[reply.status], response
    denied = response.denied_response
    assert denied.status.code == reply.status
    assert json.loads(denied.body) == reply.json()
    headers = {o.header.key: o.header.value for o in denied.headers}
    assert headers["content-type"] == "application/json"
    assert headers.get("www-authenticate") == reply.headers.get("WWW-Authenticate")
    return reply


async def test_same_decisions_as_http(grpc_api: Api, envoy: Envoy) -> None:
    api = grpc_api
    # Given users in every state
    await api.event("connected", "1", session_id="laptop", email="one@example.com")
    await api.event("connected", "2")
    await api.event("connected", "3", session_id="a")
    await api.event("disconnected", "3", session_id="a")
    # Then each token gets from gRPC what it gets from HTTP
    granted = await assert_same(api, envoy, mint("1", sid="laptop"))
    assert granted.headers["X-User-Email"] == "one@example.com"
    assert (await assert_same(api, envoy, mint("2"))).headers["X-User-Email"] == ""
    for token, reason in [
        (mint("1", sid="phone"), "session_ended"),
        (mint("3"), "not_connected"),
        (mint("nobody"), "not_connected"),
    ]:
        assert (await assert_same(api, envoy, token)).json()["reason"] == reason
    invalid: list[tuple[str | None, str]] = [
        (None, "missing"),
        ("garbage", "malformed"),
        (mint("1", ttl=-120), "expired"),
        (mint("1", key=OTHER_KEY), "bad_signature"),
    ]
    for bad, reason in invalid:
        assert (await assert_same(api, envoy, bad)).json()["reason"] == reason
    # And a client's forged identity headers are overwritten, never appended to
    assert ok_headers(await envoy.check(mint("2")))["x-user-id"] == "2"


async def test_idle_timeout_and_raw_headers(grpc_api: Api, envoy: Envoy) -> None:
    api = grpc_api
    await api.event("connected", "5", session_id="s")
    # encode_raw_headers: the token comes from header_map
    assert ok_headers(await envoy.check(mint("5", sid="s"), raw=True))["x-session-id"] == "s"
    await api.app.ctx.recorder.flush()
    await api.cache.client.delete("activity")
    api.clock.advance(api.settings.idle_timeout_s + 60)
    reply = await assert_same(api, envoy, mint("5", sid="s"))
    assert (reply.status, reply.json()["reason"]) == (403, "idle_timeout")


async def test_lifetime(api_factory: ApiFactory) -> None:
    api = await api_factory(grpc_port=free_port(), session_max_s=600)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api.settings.grpc_port}") as channel:
        envoy = Envoy(channel)
        await api.event("connected", "6", session_id="s")
        api.clock.advance(700)
        reply = await assert_same(api, envoy, mint("6", sid="s"))
        assert (reply.status, reply.json()["reason"]) == (403, "max_lifetime")


async def test_redis_down_same_answers_and_outage_is_unavailable(
    api_factory: ApiFactory,
) -> None:
    # Given an API whose Redis is unreachable (PostgreSQL decides)
    api = await api_factory(grpc_port=free_port(), redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api.settings.grpc_port}") as channel:
        envoy = Envoy(channel)
        await api.event("connected", "7", session_id="s")
        # Then gRPC and HTTP agree, from PostgreSQL
        assert (await assert_same(api, envoy, mint("7", sid="s"))).status == 200
        assert (await assert_same(api, envoy, mint("nobody"))).status == 403
        assert (await assert_same(api, envoy, "garbage")).status == 401
        # When only Redis could tell (PostgreSQL's times say idle): HTTP 503, gRPC UNAVAILABLE
        api.clock.advance(api.settings.idle_timeout_s + 60)
        assert (await api.get("/auth/check", token=mint("7", sid="s"))).status == 503
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await envoy.check(mint("7", sid="s"))
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health(envoy: Envoy) -> None:
    for service in ("", "envoy.service.auth.v3.Authorization"):
        answer = await envoy.health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await envoy.health.Check(health_pb2.HealthCheckRequest(service="nope"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def grpc_listeners(port: int) -> int:
    """Listening TCP sockets on ``port`` (one per process sharing it with SO_REUSEPORT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
                count += 1
    return count


def http_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/live", timeout=2) as reply:
            return int(reply.status) == 200
    except OSError:
        return False


@pytest.mark.slow
async def test_every_sanic_worker_serves_grpc_on_one_port(
    migrated: Any, spawn: Callable[..., Process]
) -> None:
    # Given `sessiond api --workers 2` with SESSIOND_GRPC_PORT
    await truncate(migrated)
    http_port, grpc_port = free_port(), free_port()
    proc = spawn(
        "api", "--workers", "2", "--port", str(http_port),
        env={"SESSIOND_GRPC_PORT": str(grpc_port)},
    )  # fmt: skip
    # Then both workers listen on the gRPC port (SO_REUSEPORT), and it answers
    await async_wait_until(
        lambda: asyncio.to_thread(lambda: proc.alive() and grpc_listeners(grpc_port) == 2),
        timeout=60,
    )
    assert proc.alive(), proc.output()[-3000:]
    # (and HTTP too: Sanic 25.12 can hang on a SIGTERM that lands while its workers still start)
    await async_wait_until(lambda: asyncio.to_thread(http_ok, http_port), timeout=60)
    await asyncio.sleep(1.5)
    for _ in range(4):  # new connections, spread by the kernel
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            response = await Envoy(channel).check(mint("nobody"))
            assert response.status.code == code_pb2.PERMISSION_DENIED
    # And a graceful stop closes it with the HTTP port
    assert proc.stop() == 0, proc.output()[-3000:]
    assert grpc_listeners(grpc_port) == 0


async def test_revocation_reasons_match_http(grpc_api: Api, envoy: Envoy) -> None:
    api = grpc_api
    # Given a user logged out everywhere, then back: tokens issued before are fenced (401)
    await api.event("connected", "8", session_id="a")
    old = mint("8", sid="b", iat=int(time.time()) - 600)
    await api.event("disconnected", "8")
    await api.event("connected", "8", session_id="b")
    reply = await assert_same(api, envoy, old)
    assert (reply.status, reply.json()["reason"]) == (401, "revoked")
    # And a blocked user: 403 blocked on both
    admin = mint("root", roles=["admin"])
    assert (await api.post("/admin/users/8/block", token=admin)).status == 200
    reply = await assert_same(api, envoy, mint("8", sid="b"))
    assert (reply.status, reply.json()["reason"]) == (403, "blocked")
