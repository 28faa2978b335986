"""The typed ``app.ctx`` and the Sanic type aliases every blueprint uses."""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

from sanic import Request, Sanic
from sanic.config import Config

from api.access import AccessControl, Clock
from api.logout_token import LogoutTokenValidator
from api.metrics import Metrics, SharedMetrics
from api.reconciler import Reconciler
from api.recorder import Recorder
from api.tokens import TokenValidator
from sessiond.config import Settings
from storage.activity import ActivityBuffer
from storage.cache import Cache
from storage.redis_conn import AsyncClient

if TYPE_CHECKING:
    from api.grpc_authz import GrpcServer


class AppContext:
    """Built by ``create_app`` (settings, clock, tokens, metrics); the connection-backed members
    (``redis`` … ``access``) are set by the ``before_server_start`` listener of each worker."""

    redis: AsyncClient
    cache: Cache
    activity: ActivityBuffer
    recorder: Recorder
    access: AccessControl
    reconciler: Reconciler

    def __init__(
        self, *, settings: Settings, clock: Clock, tokens: TokenValidator, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.tokens = tokens
        self.metrics = metrics
        self.shared_metrics: SharedMetrics | None = None
        self.grpc: GrpcServer | None = None
        # OIDC back-channel logout (``api.routes.backchannel``): the bearer tokens' JWKS.
        self.logout_tokens = LogoutTokenValidator(settings, tokens.keys, now=clock)
        self.logout_tokens.check_configuration()


App = Sanic[Config, AppContext]
Req = Request[App, SimpleNamespace]
