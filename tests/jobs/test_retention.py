"""The de-duplication ledger's retention (and the first receipts', ``storage.receipts``): old rows
go in bounded batches, and an event whose ledger row is gone is still a no-op when it comes back
(the data's ordering fences refuse it)."""

from __future__ import annotations

import logging
from datetime import timedelta

import asyncpg
import pytest

from actors.jobs import sweep_job
from sessiond.config import Settings
from sessiond.events import Event
from storage import cache as cache_mod
from storage import retention, state
from tests.jobs.conftest import NOW

pytestmark = pytest.mark.integration


async def ledger(pg: asyncpg.Connection) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM processed_events"))


async def receipts(pg: asyncpg.Connection) -> list[str]:
    return [r["key"] for r in await pg.fetch("SELECT key FROM event_receipts ORDER BY key")]


async def test_rows_older_than_the_retention_go_in_batches(
    db: Settings, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 25 ledger rows 8 days old and 5 from today
    await pg.execute(
        "INSERT INTO processed_events (key, user_id, processed_at)"
        " SELECT 'old-' || g, 'u', $1::timestamptz - interval '8 days' - g * interval '1 s'"
        " FROM generate_series(1, 25) AS g",
        NOW,
    )
    await pg.execute(
        "INSERT INTO processed_events (key, user_id, processed_at)"
        " SELECT 'new-' || g, 'u', $1 FROM generate_series(1, 5) AS g",
        NOW,
    )
    monkeypatch.setattr(retention, "BATCH", 10)

    # When a purge may take 20 rows, then another runs
    first = await retention.purge("processed_events", before=NOW - timedelta(days=7), max_rows=20)
    second = await retention.purge("processed_events", before=NOW - timedelta(days=7), max_rows=20)

    # Then the oldest 20 went first, the other 5 next, and today's rows stayed
    assert (first, second) == (20, 5)
    keys = {r["key"] for r in await pg.fetch("SELECT key FROM processed_events")}
    assert keys == {f"new-{g}" for g in range(1, 6)}


async def test_a_redelivered_event_past_the_retention_changes_nothing(
    db: Settings, pg: asyncpg.Connection, cache: cache_mod.Cache
) -> None:
    # Given a login and a logout applied, and their ledger rows purged
    login = Event(kind="connected", user_id="u1", session_id="a", occurred_at=NOW, event_id="e1")
    logout = Event(
        kind="disconnected", user_id="u1", session_id="a", occurred_at=NOW + timedelta(1),
        event_id="e2",
    )  # fmt: skip
    await state.apply_event(login)
    await state.apply_event(logout)
    await pg.execute("UPDATE processed_events SET processed_at = $1", NOW - timedelta(days=8))
    assert await retention.purge("processed_events", before=NOW - timedelta(days=7)) == 2
    before = await pg.fetchrow("SELECT status, version FROM users WHERE id = 'u1'")
    events_out = await pg.fetchval("SELECT count(*) FROM outbox")

    # When the login is delivered again
    again = await state.apply_event(login)

    # Then it is refused as stale: the user stays disconnected, nothing is announced again
    assert (again.applied, again.reason) == (False, "stale")
    after = await pg.fetchrow("SELECT status, version FROM users WHERE id = 'u1'")
    assert tuple(after) == tuple(before) == ("disconnected", before["version"])
    assert await pg.fetchval("SELECT count(*) FROM outbox") == events_out


async def test_the_sweep_job_purges_and_a_dry_run_does_not(
    db: Settings, pg: asyncpg.Connection, cache: cache_mod.Cache, caplog: pytest.LogCaptureFixture
) -> None:
    # At INFO, as production logs: the partitions' log line once raised KeyError ('created')
    caplog.set_level(logging.INFO, logger="storage.retention")
    # Given an 8-day-old ledger row, and first receipts 8 days and 1 hour old
    await pg.execute(
        "INSERT INTO processed_events (key, user_id, processed_at) VALUES ('old', 'u', $1)",
        NOW - timedelta(days=8),
    )
    await pg.execute(
        "INSERT INTO event_receipts (key, received_at, stamped_at)"
        " VALUES ('old', $1, $1), ('new', $2, $2)",
        NOW - timedelta(days=8),
        NOW - timedelta(hours=1),
    )
    # A dry run deletes nothing
    dry = await sweep_job(db, cache, now=NOW, dry_run=True)
    assert "dedup_purged" not in dry and await ledger(pg) == 1
    assert await receipts(pg) == ["new", "old"]
    # By default the ledger and the receipts are pruned with the same retention (audit
    # partitions: tests/jobs/test_partitions.py)
    done = await sweep_job(db, cache, now=NOW)
    assert done["dedup_purged"] == 1 and await ledger(pg) == 0
    assert done["receipts_purged"] == 1 and await receipts(pg) == ["new"]
