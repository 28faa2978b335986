"""The module Dramatiq's CLI loads (``dramatiq actors.app``): broker first, then the actors."""

from __future__ import annotations

import dramatiq

from actors import events, ingress, jobs
from actors.broker import build_broker
from actors.runtime import Runtime
from sessiond.config import get_settings
from sessiond.logs import setup_logging

settings = get_settings()
setup_logging(settings.log_level)
runtime = Runtime(settings)


def sources() -> list[ingress.Source]:
    return [ingress.auth_source(settings)]


broker = build_broker(settings, runtime, sources)
dramatiq.set_broker(broker)
actors = events.declare(runtime, broker)
actors += jobs.declare(runtime, broker)
