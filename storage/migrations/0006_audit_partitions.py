"""audit_events partitioned: by retention class (LIST on ``kind``), then by day (RANGE on ``at``).

Access entries (``access``, ``access_log_overflow``) and lifecycle entries (every other kind) are
kept for different times, and a day's rows go by dropping that day's partition instead of by
``DELETE``. Each class has a DEFAULT partition, so a row never fails for want of a partition
(the sweep creates days ahead; ``audit_partition_create`` moves rows a default partition holds for
a day it then creates). The primary key includes the partition key, as PostgreSQL requires.
Today's rows are kept: they are copied into the new table, in daily partitions of their own days.
"""

from tortoise import migrations
from tortoise.migrations import operations as ops

CREATE_FUNCTION = """
CREATE OR REPLACE FUNCTION audit_partition_create(parent text, day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    name text := parent || '_p' || to_char(day, 'YYYYMMDD');
    lo timestamptz := day::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS)', name, parent);
    EXECUTE format(
        'WITH moved AS (DELETE FROM %I WHERE at >= $1 AND at < $2 RETURNING *) '
        'INSERT INTO %I SELECT * FROM moved', parent || '_default', name
    ) USING lo, hi;
    EXECUTE format(
        'ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', parent, name, lo, hi
    );
    RETURN true;
END
$$
"""

SWAP = [
    "ALTER TABLE audit_events RENAME TO audit_events_unpartitioned",
    "ALTER TABLE audit_events_unpartitioned RENAME CONSTRAINT audit_events_pkey"
    " TO audit_events_unpartitioned_pkey",
    "DROP INDEX IF EXISTS audit_at_idx",
    "DROP INDEX IF EXISTS audit_user_at_idx",
    "ALTER SEQUENCE audit_events_id_seq OWNED BY NONE",
    """
    CREATE TABLE audit_events (
        id BIGINT NOT NULL DEFAULT nextval('audit_events_id_seq'),
        at TIMESTAMPTZ NOT NULL DEFAULT now(),
        occurred_at TIMESTAMPTZ,
        user_id VARCHAR(128),
        session_id VARCHAR(128),
        kind VARCHAR(32) NOT NULL,
        reason VARCHAR(64),
        source VARCHAR(32) NOT NULL,
        detail JSONB,
        CONSTRAINT audit_events_pkey PRIMARY KEY (id, kind, at)
    ) PARTITION BY LIST (kind)
    """,
    "CREATE TABLE audit_events_access PARTITION OF audit_events"
    " FOR VALUES IN ('access', 'access_log_overflow') PARTITION BY RANGE (at)",
    "CREATE TABLE audit_events_lifecycle PARTITION OF audit_events DEFAULT"
    " PARTITION BY RANGE (at)",
    "CREATE TABLE audit_events_access_default PARTITION OF audit_events_access DEFAULT",
    "CREATE TABLE audit_events_lifecycle_default PARTITION OF audit_events_lifecycle DEFAULT",
    "CREATE INDEX audit_user_at_idx ON audit_events (user_id, at)",
    "CREATE INDEX audit_at_idx ON audit_events (at)",
    CREATE_FUNCTION,
    """
    DO $$
    DECLARE
        d date;
        today date := (now() AT TIME ZONE 'UTC')::date;
    BEGIN
        FOR d IN
            SELECT DISTINCT (at AT TIME ZONE 'UTC')::date FROM audit_events_unpartitioned
            WHERE kind IN ('access', 'access_log_overflow')
            UNION SELECT generate_series(today, today + 7, interval '1 day')::date
        LOOP
            PERFORM audit_partition_create('audit_events_access', d);
        END LOOP;
        FOR d IN
            SELECT DISTINCT (at AT TIME ZONE 'UTC')::date FROM audit_events_unpartitioned
            WHERE kind NOT IN ('access', 'access_log_overflow')
            UNION SELECT generate_series(today, today + 7, interval '1 day')::date
        LOOP
            PERFORM audit_partition_create('audit_events_lifecycle', d);
        END LOOP;
    END
    $$
    """,
    "INSERT INTO audit_events (id, at, occurred_at, user_id, session_id, kind, reason, source,"
    " detail) SELECT id, at, occurred_at, user_id, session_id, kind, reason, source, detail"
    " FROM audit_events_unpartitioned",
    "DROP TABLE audit_events_unpartitioned",
    "ALTER SEQUENCE audit_events_id_seq OWNED BY audit_events.id",
]


class Migration(migrations.Migration):
    dependencies = [("models", "0005_revocation")]

    initial = False

    operations = [ops.RunSQL(SWAP, atomic=True)]
