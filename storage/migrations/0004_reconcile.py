"""The cache reconciler's high-water mark (``storage.reconcile``).

- ``users.change_xid``: the id of the transaction that last changed the user's version, set by a
  trigger so that every writer (events, admin routes, the sweep, a hand-written UPDATE) stamps
  it; the reconciler reads changes by transaction id against a snapshot's ``xmin``, which is
  safe whatever order transactions commit in.
- The same trigger takes ``updated_at`` with ``clock_timestamp()`` (the time of the write, at
  the end of the transaction for the pipeline) instead of ``now()`` (its start).
- ``cache_reconcile``: where the last successful turn got to, so that a turn continues from
  there after any outage.
"""

from tortoise import migrations
from tortoise.migrations import operations as ops

FORWARD = [
    "ALTER TABLE users ADD COLUMN change_xid xid8",
    "CREATE INDEX users_change_xid_idx ON users (change_xid, id)",
    """
    CREATE FUNCTION sessiond_users_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' OR NEW.version IS DISTINCT FROM OLD.version THEN
            NEW.change_xid := pg_current_xact_id();
            NEW.updated_at := clock_timestamp();
        END IF;
        RETURN NEW;
    END
    $$
    """,
    """
    CREATE TRIGGER users_changed BEFORE INSERT OR UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION sessiond_users_changed()
    """,
    """
    CREATE TABLE cache_reconcile (
        name VARCHAR(32) PRIMARY KEY,
        hwm xid8 NOT NULL,
        turns BIGINT NOT NULL DEFAULT 0,
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )
    """,
]

BACKWARD = [
    "DROP TABLE cache_reconcile",
    "DROP TRIGGER users_changed ON users",
    "DROP FUNCTION sessiond_users_changed()",
    "DROP INDEX users_change_xid_idx",
    "ALTER TABLE users DROP COLUMN change_xid",
]


class Migration(migrations.Migration):
    dependencies = [("models", "0003_users_updated")]

    initial = False

    operations = [ops.RunSQL(FORWARD, reverse_sql=BACKWARD)]
