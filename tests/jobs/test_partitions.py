"""audit_events by class and day (migration 0006): the sweep creates days ahead and drops whole
days past each class's retention, on the real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from actors.jobs import sweep_job
from sessiond.config import Settings
from storage import cache as cache_mod
from storage import retention

pytestmark = pytest.mark.integration

# Its own far-away days: partitions outlive the tests' TRUNCATE, so no other test shares them.
NOW = datetime(2031, 6, 15, 12, 0, tzinfo=UTC)


async def partition_of(pg: asyncpg.Connection, kind: str, at: datetime) -> str:
    row = await pg.fetchrow(
        "INSERT INTO audit_events (at, kind, source) VALUES ($1, $2, 'test')"
        " RETURNING tableoid::regclass::text AS part",
        at,
        kind,
    )
    assert row is not None
    return str(row["part"])


async def test_the_sweep_creates_days_ahead_and_drops_days_past_retention(
    db: Settings, pg: asyncpg.Connection, cache: cache_mod.Cache
) -> None:
    # Given access rows of 40 days ago (in its own day partition) and of 35 days ago (no day
    # partition: the class's default one), and lifecycle rows of 40 and 20 days ago
    old_day = (NOW - timedelta(days=40)).date()
    assert await pg.fetchval("SELECT audit_partition_create('audit_events_access', $1)", old_day)
    assert await partition_of(pg, "access", NOW - timedelta(days=40)) == (
        f"audit_events_access_p{old_day:%Y%m%d}"
    )
    assert await partition_of(pg, "access", NOW - timedelta(days=35)) == (
        "audit_events_access_default"
    )
    assert await partition_of(pg, "connected", NOW - timedelta(days=40)) == (
        "audit_events_lifecycle_default"
    )
    await partition_of(pg, "expired", NOW - timedelta(days=20))

    # When the sweep runs with the defaults (access 30 days, lifecycle 400 days)
    done = await sweep_job(db, cache, now=NOW)

    # Then today and the next 7 days exist for both classes, rows of today land in them
    for audit_class in retention.AUDIT_CLASSES:
        days = await retention.audit_partitions(audit_class)
        assert {NOW.date() + timedelta(days=d) for d in range(8)} <= set(days)
    assert done["audit_partitions_created"] >= 16
    assert await partition_of(pg, "access", NOW) == f"audit_events_access_p{NOW:%Y%m%d}"
    assert await partition_of(pg, "disconnected", NOW + timedelta(days=3)) == (
        f"audit_events_lifecycle_p{NOW + timedelta(days=3):%Y%m%d}"
    )
    # and the access day past 30 days went whole, its default-partition row by a delete
    assert done["audit_partitions_dropped"] >= 1 and done["audit_purged"] == 1
    assert (
        await pg.fetchval("SELECT to_regclass($1)", f"audit_events_access_p{old_day:%Y%m%d}")
        is None
    )
    kinds = await pg.fetch("SELECT kind, at FROM audit_events WHERE source = 'test' ORDER BY at")
    assert [(r["kind"], (NOW - r["at"]).days) for r in kinds[:2]] == [
        ("connected", 40),
        ("expired", 20),
    ]
    assert {r["kind"] for r in kinds[2:]} == {"access", "disconnected"}


async def test_an_operator_sets_the_retention_and_a_day_created_late_takes_its_rows(
    db: Settings, pg: asyncpg.Connection, cache: cache_mod.Cache
) -> None:
    # Given a lifecycle row of a day that has no partition yet (it landed in the default one)
    late = NOW + timedelta(days=30)
    assert await partition_of(pg, "connected", late) == "audit_events_lifecycle_default"

    # When the sweep runs on that day: the day's partition is created and takes the row
    await sweep_job(db, cache, now=late)
    assert (
        await pg.fetchval("SELECT tableoid::regclass::text FROM audit_events WHERE at = $1", late)
        == f"audit_events_lifecycle_p{late:%Y%m%d}"
    )

    # And with a lifecycle retention of 10 days, 11 days later that day is dropped
    ten_days = db.model_copy(update={"audit_lifecycle_retention_days": 10})
    done = await sweep_job(ten_days, cache, now=late + timedelta(days=11))
    assert f"audit_events_lifecycle_p{late:%Y%m%d}" not in {
        name for name in (await retention.audit_partitions("lifecycle")).values()
    }
    assert done["audit_partitions_dropped"] >= 1
    assert await pg.fetchval("SELECT count(*) FROM audit_events WHERE at = $1", late) == 0
    # while a retention of 0 keeps every lifecycle day, however old
    keep = db.model_copy(update={"audit_lifecycle_retention_days": 0})
    await sweep_job(keep, cache, now=late + timedelta(days=500))
    kept = set((await retention.audit_partitions("lifecycle")).values())
    assert f"audit_events_lifecycle_p{(late + timedelta(days=11)):%Y%m%d}" in kept


async def test_the_migration_keeps_the_rows_of_the_unpartitioned_table(settings: Settings) -> None:
    # Given a database of its own at migration 0005 (audit_events not partitioned), with rows
    from tortoise.migrations.api.migrate import migrate

    from storage import db as db_mod

    base, _, _ = settings.database_url.rpartition("/")
    admin = await asyncpg.connect(settings.database_url)
    try:
        await admin.execute("DROP DATABASE IF EXISTS sessiond_test_mig0006")
        await admin.execute("CREATE DATABASE sessiond_test_mig0006")
    finally:
        await admin.close()
    own = settings.model_copy(update={"database_url": f"{base}/sessiond_test_mig0006"})
    config = db_mod.tortoise_config(own)
    await migrate(config=config, target="models.0005_revocation")
    await db_mod.close_db()
    pg = await asyncpg.connect(own.database_url)
    try:
        await pg.execute(
            "INSERT INTO audit_events (at, kind, source, user_id) VALUES"
            " (now() - interval '3 days', 'connected', 'auth', 'u1'),"
            " (now() - interval '40 days', 'access', 'api', 'u2'), (now(), 'access', 'api', 'u3')"
        )
        before = await pg.fetch("SELECT * FROM audit_events ORDER BY id")

        # When 0006 runs
        await db_mod.migrate(own)

        # Then the same rows are there, each in its class's partition of its own day
        after = await pg.fetch(
            "SELECT *, tableoid::regclass::text AS part FROM audit_events ORDER BY id"
        )
        assert [dict(r) | {"part": None} for r in after] == [
            dict(r) | {"part": None} for r in before
        ]
        assert [r["part"] for r in after] == [
            f"audit_events_lifecycle_p{before[0]['at']:%Y%m%d}",
            f"audit_events_access_p{before[1]['at']:%Y%m%d}",
            f"audit_events_access_p{before[2]['at']:%Y%m%d}",
        ]
        # and new rows continue the id sequence
        new_id = await pg.fetchval(
            "INSERT INTO audit_events (kind, source) VALUES ('expired', 'sweep') RETURNING id"
        )
        assert new_id == 4
    finally:
        await pg.close()
