"""The access journal stays bounded: paged drains, capped buffers whose overflow is counted and
journaled, refused tokens aggregated per minute. Real Redis and PostgreSQL throughout."""

from __future__ import annotations

import json
import time
import tracemalloc
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from api.metrics import Metrics
from api.recorder import Recorder
from loadtests.harness import free_port
from sessiond.config import Settings
from storage import access_flush, flush
from storage import cache as cache_mod
from storage.activity import (
    ACCESS_LOG_BYTES_KEY,
    ACCESS_LOG_KEY,
    ACCESS_LOG_OVERFLOW_KEY,
    REFUSED_KEY,
    AccessLog,
    ActivityBuffer,
    Page,
)
from storage.db import conn
from tests.api.conftest import Api

pytestmark = pytest.mark.integration

T0 = 1_900_000_020.0  # a minute boundary (divisible by 60)


def entries(log: AccessLog, n: int, *, start: int = 0) -> list[str]:
    return [
        log.encode(T0 + i, f"user-{i}", "phone", "granted", None, "/auth/check")
        for i in range(start, start + n)
    ]


async def backlog(log: AccessLog, n: int) -> None:
    for start in range(0, n, 5000):
        assert await log.append(entries(log, min(5000, n - start), start=start)) == 0


async def access_rows(pg: asyncpg.Connection) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM audit_events WHERE kind = 'access'"))


async def drain(log: AccessLog, cache: cache_mod.Cache, *, page: int) -> flush.FlushResult:
    return await flush.flush_activity(ActivityBuffer(cache.client), access_log=log, batch_size=page)


async def test_a_backlog_of_many_pages_drains_with_one_page_in_memory(
    db: Settings, cache: cache_mod.Cache, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AccessLog(cache.client)
    seen: list[tuple[int, int]] = []  # (entries, bytes) of each page read
    read_page = log.read_page

    async def spy(size: int) -> Page | None:
        page = await read_page(size)
        if page is not None:
            seen.append((page.count, page.nbytes))
        return page

    monkeypatch.setattr(log, "read_page", spy)

    async def peak_of_drain(n: int) -> int:
        await backlog(log, n)
        tracemalloc.start()
        result = await drain(log, cache, page=1000)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert result.access_entries == n and result.access_pages == n // 1000
        return peak

    # Given backlogs of 4,000 and of 24,000 entries, drained in pages of 1,000
    small = await peak_of_drain(4_000)
    large = await peak_of_drain(24_000)

    # Then everything reached PostgreSQL, the list and its byte count are gone
    assert await access_rows(pg) == 28_000
    assert await cache.client.exists(ACCESS_LOG_KEY, ACCESS_LOG_BYTES_KEY) == 0
    # and no read held more than a page: 1,000 entries, their bytes measured
    assert max(count for count, _ in seen) == 1000
    biggest = max(nbytes for _, nbytes in seen)
    assert biggest < 1000 * 200, biggest
    # and the drain's memory does not grow with the backlog (6 times larger, same peak)
    assert large < 2 * small, (small, large)


async def test_a_crash_between_insert_and_trim_journals_one_page_twice_and_loses_none(
    db: Settings, cache: cache_mod.Cache, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 5,500 entries and a flush that dies after its third page's insert, before the trim
    log = AccessLog(cache.client)
    await backlog(log, 5_500)
    real_ack = log.ack
    acks = 0

    async def dying_ack(page: Page) -> None:
        nonlocal acks
        acks += 1
        if acks == 3:
            raise ConnectionError("worker killed")
        await real_ack(page)

    monkeypatch.setattr(log, "ack", dying_ack)
    with pytest.raises(ConnectionError):
        await drain(log, cache, page=1000)
    assert await access_rows(pg) == 3000

    # When the next flush runs
    monkeypatch.setattr(log, "ack", real_ack)
    result = await drain(log, cache, page=1000)

    # Then the unacknowledged page was journaled again (once), and every entry is there
    assert result.access_entries == 3_500
    assert await access_rows(pg) == 5_500 + 1000
    distinct = await pg.fetchval(
        "SELECT count(DISTINCT user_id) FROM audit_events WHERE kind = 'access'"
    )
    assert distinct == 5_500
    assert await cache.client.llen(ACCESS_LOG_KEY) == 0


async def overflow_rows(pg: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await pg.fetch(
        "SELECT detail FROM audit_events WHERE kind = 'access_log_overflow' ORDER BY id"
    )
    return [json.loads(r["detail"]) for r in rows]


async def test_past_its_caps_the_redis_list_counts_and_the_count_is_journaled(
    db: Settings, cache: cache_mod.Cache, pg: asyncpg.Connection
) -> None:
    # Given a list capped at 100 entries (PostgreSQL down: nothing drains it)
    log = AccessLog(cache.client, max_entries=100)
    assert await log.append(entries(log, 60)) == 0
    # When 90 more arrive: 40 fit, 50 are counted, not stored
    assert await log.append(entries(log, 90, start=60)) == 50
    assert await cache.client.llen(ACCESS_LOG_KEY) == 100
    # and a byte cap holds the same way (about 3 entries' worth of room left)
    size = int(await cache.client.get(ACCESS_LOG_BYTES_KEY) or 0)
    by_bytes = AccessLog(cache.client, max_bytes=size + 3 * 110)
    assert await by_bytes.append(entries(log, 10, start=200)) == 10 - (
        await cache.client.llen(ACCESS_LOG_KEY) - 100
    )
    stored = await cache.client.llen(ACCESS_LOG_KEY)
    assert 101 <= stored <= 104

    # When PostgreSQL is back and the flush runs
    result = await drain(log, cache, page=1000)

    # Then the stored entries are journaled and so is the count of the others
    assert result.access_entries == stored
    dropped = 50 + 10 - (stored - 100)
    assert result.overflow_count == dropped
    assert await overflow_rows(pg) == [{"dropped": dropped, "buffer": "redis"}]
    assert await cache.client.exists(ACCESS_LOG_OVERFLOW_KEY) == 0


async def test_past_its_caps_the_api_buffer_counts_while_redis_is_down(
    db: Settings, cache: cache_mod.Cache, pg: asyncpg.Connection
) -> None:
    # Given an API process whose Redis is down (nothing listens on its port), capped at 10
    down = aioredis.Redis(port=free_port(), socket_connect_timeout=0.2)
    metrics = Metrics()
    recorder = Recorder(down, ActivityBuffer(down), overflow=metrics.overflow, max_backlog=10)
    for i in range(25):
        recorder.record(T0 + i, f"u{i}", None, "granted", None, "/auth/check")
    await recorder.flush()  # fails: kept, within the cap

    # Then 10 wait, 15 were counted and exported as a metric
    assert (len(recorder._entries), recorder.dropped) == (10, 15)
    assert metrics.overflow.get("api") == 15
    assert 'sessiond_access_log_overflow_total{buffer="api"} 15' in metrics.render()

    # When Redis answers again: the 10 and the count reach it, and the flush journals both
    recorder.client = cache.client
    recorder.access_log = AccessLog(cache.client)
    recorder.activity = ActivityBuffer(cache.client)
    await recorder.flush()
    await down.aclose()
    assert await cache.client.llen(ACCESS_LOG_KEY) == 10
    result = await drain(AccessLog(cache.client), cache, page=1000)
    assert (result.access_entries, result.overflow_count) == (10, 15)
    assert await overflow_rows(pg) == [{"dropped": 15, "buffer": "api"}]


async def test_refused_tokens_are_one_row_per_minute_route_reason_and_client(
    db: Settings, cache: cache_mod.Cache, pg: asyncpg.Connection
) -> None:
    # Given 300 refused tokens in minute T0 from two clients, 5 of another reason, and 7 in the
    # minute that is still running; all pushed by one API process in several batches
    clients = iter(["10.0.0.1", "10.0.0.2"] * 200)
    recorder = Recorder(
        cache.client, ActivityBuffer(cache.client), client_address=lambda: next(clients)
    )
    for batch in range(3):
        for i in range(100):
            recorder.record(
                T0 + batch * 10 + i * 0.1, None, None, "invalid_token", "malformed", "/auth/check"
            )
        await recorder.flush()
    for _ in range(5):
        recorder.record(T0 + 30, None, None, "invalid_token", "expired", "/auth/check")
    for i in range(7):
        recorder.record(T0 + 60 + i, None, None, "invalid_token", "expired", "/auth/check")
    await recorder.flush()
    assert await cache.client.llen(ACCESS_LOG_KEY) == 0  # none stored one by one

    # When the flush runs while the second minute is still open
    log = AccessLog(cache.client)
    res = flush.FlushResult()
    await access_flush.drain_access_log(log, conn(), res, batch_size=1000, now=T0 + 90)

    # Then the closed minute is one row per (route, reason, client) with its count
    rows = await pg.fetch(
        "SELECT occurred_at, reason, detail FROM audit_events WHERE kind = 'access'"
        " ORDER BY reason, detail->>'client'"
    )
    got = [
        (r["reason"], json.loads(r["detail"])["client"], json.loads(r["detail"])["count"])
        for r in rows
    ]
    assert got == [
        ("expired", "10.0.0.1", 3),
        ("expired", "10.0.0.2", 2),
        ("malformed", "10.0.0.1", 150),
        ("malformed", "10.0.0.2", 150),
    ]
    assert {r["occurred_at"].timestamp() for r in rows} == {T0}
    assert (res.refused_rows, res.refused_count) == (4, 305)
    # and the open minute waits for its end, then is journaled too
    assert await cache.client.hlen(REFUSED_KEY) == 2
    await access_flush.drain_access_log(log, conn(), res, batch_size=1000, now=T0 + 130)
    assert await access_rows(pg) == 6 and await cache.client.exists(REFUSED_KEY) == 0


async def test_a_flood_of_garbage_tokens_writes_one_row_a_minute(
    api: Api, pg: asyncpg.Connection
) -> None:
    # Given 200 requests with garbage tokens against the real API
    for _ in range(200):
        assert (await api.get("/auth/check", token="garbage")).status == 401
    await api.app.ctx.recorder.flush()
    # When the flush runs after that minute
    res = flush.FlushResult()
    await access_flush.drain_access_log(
        AccessLog(api.cache.client), conn(), res, batch_size=1000, now=time.time() + 130
    )
    # Then the journal holds one row for them per minute (they may straddle two), with the count
    rows = await pg.fetch(
        "SELECT occurred_at, reason, detail FROM audit_events WHERE kind = 'access'"
    )
    assert {r["reason"] for r in rows} == {"malformed"}
    assert sum(json.loads(r["detail"])["count"] for r in rows) == 200
    assert len(rows) == len({r["occurred_at"] for r in rows}) <= 2
