"""Periodic job actors (activity flush, idle expiry) and their one-shot form for the CLI.

The scheduler (``actors.scheduler``) enqueues one message per tick on the jobs queue. The jobs are
idempotent and serialised by a Redis lock (``storage.flush.activity_lock``), so a duplicate or a
late message is harmless. They are never retried: the next tick is the retry. A message older than
a few periods is dropped (``max_age``) so that a backlog built while no worker ran does not replay
a burst of identical jobs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq

from actors.runtime import Runtime
from actors.topology import JOBS_QUEUE
from sessiond.config import Settings, get_settings
from storage import db as db_mod
from storage import expiry, flush, retention
from storage.activity import AccessLog, ActivityBuffer
from storage.cache import Cache
from storage.redis_conn import connect

log = logging.getLogger(__name__)

FLUSH = "flush_activity"
EXPIRE = "expire_idle"
ALIASES = {"flush": FLUSH, FLUSH: FLUSH, "sweep": EXPIRE, EXPIRE: EXPIRE}


def period_s(settings: Settings, job: str) -> float:
    """How often the scheduler enqueues ``job``."""
    return settings.activity_flush_s if job == FLUSH else settings.expiry_period_s


async def flush_job(
    cache: Cache, *, lock_wait_s: float = 0.0, settings: Settings | None = None
) -> dict[str, Any]:
    settings = settings or get_settings()
    result = await flush.flush_activity(
        ActivityBuffer(cache.client),
        access_log=AccessLog.configured(cache.client, settings),
        lock_wait_s=lock_wait_s,
        batch_size=settings.access_log_page,
    )
    return result.to_dict()


async def sweep_job(
    settings: Settings, cache: Cache, *, now: datetime | None = None, dry_run: bool = False
) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    result = await expiry.sweep(
        cache,
        ActivityBuffer(cache.client),
        access_log=AccessLog.configured(cache.client, settings),
        now=now,
        idle_timeout_s=settings.idle_timeout_s,
        idle_scope=settings.idle_scope,
        batch_size=settings.expiry_batch_size,
        dry_run=dry_run,
        session_max_s=settings.session_max_s or None,
    )
    done = result.to_dict()
    if dry_run:
        return done
    if settings.dedup_retention_s:
        before = now - timedelta(seconds=settings.dedup_retention_s)
        done["dedup_purged"] = await retention.purge("processed_events", before=before)
        done["receipts_purged"] = await retention.purge("event_receipts", before=before)
    parts = await retention.maintain_audit_partitions(
        now,
        retention_days={
            "access": settings.audit_access_retention_days,
            "lifecycle": settings.audit_lifecycle_retention_days,
        },
        ahead_days=settings.audit_partitions_ahead_days,
    )
    done["audit_partitions_created"] = len(parts.created)
    done["audit_partitions_dropped"] = len(parts.dropped)
    done["audit_purged"] = parts.purged
    return done


def _log_result(job: str, result: dict[str, Any], busy: Callable[[dict[str, Any]], bool]) -> None:
    summary = {k: v for k, v in result.items() if k not in ("users", "flushed")}
    level = logging.INFO if busy(result) else logging.DEBUG
    log.log(level, "job done", extra={"job": job, **summary})


def declare(runtime: Runtime, broker: dramatiq.Broker) -> list[dramatiq.Actor[Any, Any]]:
    """Registers ``flush_activity`` and ``expire_idle`` on the jobs queue."""
    settings = runtime.settings

    def flush_activity(scheduled_at: float | None = None) -> None:
        result = runtime.run(flush_job(runtime.require_cache()))
        _log_result(FLUSH, result, lambda r: bool(r["activity_entries"] or r["access_entries"]))

    def expire_idle(scheduled_at: float | None = None) -> None:
        result = runtime.run(sweep_job(settings, runtime.require_cache()))
        _log_result(
            EXPIRE,
            result,
            lambda r: bool(
                r["expired"]
                or r["skipped"]
                or r["lifetime_sessions_ended"]
                or r.get("dedup_purged")
                or r.get("receipts_purged")
                or r.get("audit_purged")
                or r.get("audit_partitions_created")
                or r.get("audit_partitions_dropped")
            ),
        )

    def register(fn: Any, name: str, *, max_age_s: float, time_limit_s: int) -> Any:
        return dramatiq.actor(
            actor_name=name,
            queue_name=JOBS_QUEUE,
            broker=broker,
            max_retries=0,
            max_age=int(max(max_age_s, 3 * period_s(settings, name)) * 1000),
            time_limit=time_limit_s * 1000,
        )(fn)

    return [
        register(flush_activity, FLUSH, max_age_s=30, time_limit_s=5 * 60),
        register(expire_idle, EXPIRE, max_age_s=120, time_limit_s=30 * 60),
    ]


def run_once(name: str, dry_run: bool = False, now: datetime | None = None) -> dict[str, Any]:
    """One job now, outside any worker (``sessiond sweep [--dry-run]``, ``sessiond flush``)."""
    job = ALIASES.get(name)
    if job is None:
        raise ValueError(f"unknown job {name!r}; expected one of {sorted(ALIASES)}")
    settings = get_settings()

    async def main() -> dict[str, Any]:
        await db_mod.open_db(settings)
        cache = Cache(connect(settings), ttl_s=settings.cache_ttl_s)
        try:
            if job == FLUSH:
                return await flush_job(cache, lock_wait_s=30.0, settings=settings)
            return await sweep_job(settings, cache, now=now, dry_run=dry_run)
        finally:
            await cache.close()
            await db_mod.close_db()

    return {"job": job, **asyncio.run(main())}
