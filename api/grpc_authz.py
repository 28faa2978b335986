"""Envoy's external authorization over gRPC (``envoy.service.auth.v3.Authorization/Check``) and
``grpc.health.v1.Health``, served by every API process on ``SESSIOND_GRPC_PORT`` (CONTRACT §9).

What Envoy, Istio, Contour and Envoy Gateway call. The decision is ``api.decision.decide``, the
one of ``/auth/check``; only its wording differs:
- granted: ``status`` OK, ``ok_response.headers`` ``x-user-id``, ``x-user-email``,
  ``x-session-id`` (always all three, encoded as over HTTP), each ``OVERWRITE_IF_EXISTS_OR_ADD``
  so that a client's own copy never reaches the upstream;
- refused: ``status`` UNAUTHENTICATED / PERMISSION_DENIED with a ``denied_response`` of HTTP
  401 / 403, the same JSON body as ``/auth/check`` and, on 401, the same ``WWW-Authenticate``;
- a dependency down: the call fails with gRPC status UNAVAILABLE, which Envoy treats as an
  authorization-server error (``failure_mode_allow: false``: the request is refused with
  ``status_on_error``), never as a grant.

The token is read from ``attributes.request.http.headers["authorization"]`` (Envoy lower-cases
the keys) or, with Envoy's ``encode_raw_headers: true``, from ``header_map``.

Each Sanic worker runs its own ``grpc.aio`` server on its event loop; they share the port with
``SO_REUSEPORT`` (gRPC's default on Linux, set explicitly here), so the kernel spreads
connections over the workers as it does for the HTTP port.
"""

from __future__ import annotations

import logging
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from api.access import DB_CONNECTION_ERRORS
from api.decision import UNAVAILABLE, WWW_AUTHENTICATE_BEARER, Decision, decide

if TYPE_CHECKING:
    from api.context import AppContext

log = logging.getLogger(__name__)

SERVICE: Final = "envoy.service.auth.v3.Authorization"
ROUTE: Final = f"/{SERVICE}/Check"
"""The ``route`` label of metrics and journal entries of gRPC decisions."""
_OVERWRITE: Final = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_OUTAGE: Final = (*UNAVAILABLE, *DB_CONNECTION_ERRORS)
_CACHE_SIZE: Final = 10_000


def _header(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


def authorization_of(request: Any) -> str | None:
    """The ``Authorization`` value Envoy saw: the ``headers`` map (lower-case keys, repeated
    headers already joined with commas), else ``header_map`` (raw values, joined the same way)."""
    http = request.attributes.request.http
    value = http.headers.get("authorization")
    if value is not None:
        return str(value)
    found = [
        entry.raw_value.decode("utf-8", "replace") or entry.value
        for entry in http.header_map.headers
        if entry.key.lower() == "authorization"
    ]
    return ", ".join(found) if found else None


def check_response(decision: Decision) -> Any:
    """The ``CheckResponse`` for a decision (identity headers lower-cased, as HTTP/2 wants)."""
    if decision.status == 200:
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[_header(name.lower(), value) for name, value in decision.identity()]
            ),
        )
    headers = [_header("content-type", "application/json")]
    if decision.status == 401:
        code = code_pb2.UNAUTHENTICATED
        headers.append(_header("www-authenticate", WWW_AUTHENTICATE_BEARER))
    else:
        code = code_pb2.PERMISSION_DENIED
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code, message=decision.reason or ""),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status),
            headers=headers,
            body=decision.body().decode(),
        ),
    )


class Authorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """``Check`` through the shared decision. Answers are remembered serialized by their
    content (a refusal reason, or the three identity values), so a busy user costs one lookup."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._answers: dict[tuple[int, str | None, tuple[tuple[str, str], ...]], Any] = {}

    def answer(self, decision: Decision) -> Any:
        key = (
            decision.status,
            decision.reason,
            decision.identity() if decision.status == 200 else (),
        )
        response = self._answers.get(key)
        if response is None:
            if len(self._answers) >= _CACHE_SIZE:
                self._answers.clear()
            response = self._answers[key] = check_response(decision)
        return response

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        ctx = self.ctx
        started = perf_counter()
        try:
            decision = await decide(ctx.access, authorization_of(request), ROUTE)
        except _OUTAGE as exc:
            ctx.metrics.errors.inc("503")
            log.warning(
                "dependency unavailable",
                extra={"route": ROUTE, "error": f"{type(exc).__name__}: {str(exc)[:300]}"},
            )
            await context.abort(grpc.StatusCode.UNAVAILABLE, "dependency unavailable")
        finally:
            ctx.metrics.latency.observe(perf_counter() - started, ROUTE)
        return self.answer(decision)


class GrpcServer:
    """The gRPC side of one API worker: started last in ``before_server_start``, stopped first
    in ``after_server_stop`` (while the decision's Redis and PostgreSQL are still open)."""

    def __init__(self, ctx: AppContext, *, host: str, port: int, grace_s: float = 5.0) -> None:
        self.ctx = ctx
        self.address = f"{host}:{port}"
        self.grace_s = grace_s
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Authorization(self.ctx), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        server.add_insecure_port(self.address)
        await server.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        for name in ("", SERVICE):
            await self.health.set(name, serving)
        self._server = server
        log.info("grpc ext_authz serving", extra={"address": self.address})

    async def stop(self) -> None:
        """Health first says NOT_SERVING, then in-flight calls get ``grace_s`` to finish."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self.grace_s)
        self._server = None
