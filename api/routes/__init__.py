"""One blueprint per area, grouped by ``create_app``."""

from __future__ import annotations

from sanic import Blueprint

from api.routes.admin import bp as admin
from api.routes.backchannel import bp as backchannel
from api.routes.forward_auth import bp as forward_auth
from api.routes.health import bp as health
from api.routes.introspect import bp as introspect
from api.routes.me import bp as me
from api.routes.metrics import bp as metrics

BLUEPRINTS: tuple[Blueprint, ...] = (
    forward_auth,
    introspect,
    me,
    admin,
    backchannel,
    health,
    metrics,
)
