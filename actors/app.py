"""The module Dramatiq's CLI loads (``dramatiq actors.app``): broker first, then the actors."""

from __future__ import annotations

import dramatiq

from actors import events, jobs
from actors import sources as ingest_sources
from actors.broker import build_broker
from actors.outbox import OutboxMiddleware
from actors.runtime import Runtime
from sessiond.config import get_settings
from sessiond.logs import setup_logging
from sessiond.stacks import dump_on_sigusr1

settings = get_settings()
setup_logging(settings.log_level)
dump_on_sigusr1()
runtime = Runtime(settings)


def sources() -> list[ingest_sources.Source]:
    """The auth service's queue, plus Keycloak's when ``SESSIOND_KEYCLOAK_EXCHANGE`` is set."""
    return ingest_sources.sources_for(settings)


broker = build_broker(settings, runtime, sources)
broker.add_middleware(OutboxMiddleware(runtime))
dramatiq.set_broker(broker)
actors = events.declare(runtime, broker)
actors += jobs.declare(runtime, broker)
