"""Per-session idle timeout (CONTRACT §8): each session's newest sign of life.

- ``sessions.last_seen_at``: the newest granted request of the session (moved by the activity
  flush, ``storage.flush``) or its newest login. Open sessions start from the newest of their
  start, their newest event and their user's ``seen_at``: with the per-user rule before this
  migration, that is everything known of them, and no session active under the old rule is idle
  under the new one the moment it is applied.
- ``sessions_idle_idx``: the sweep's range scan of idle open sessions (``storage.expiry``). On
  ``COALESCE(last_seen_at, started_at)``: a row written without the column (a worker of the
  previous release during a rolling upgrade) is measured from its start.
"""

from tortoise import fields, migrations
from tortoise.migrations import operations as ops

FORWARD = [
    """
    UPDATE sessions s SET last_seen_at = GREATEST(s.started_at, s.last_event_at, u.seen_at)
    FROM users u
    WHERE u.id = s.user_id AND s.status = 'connected'
    """,
    """
    CREATE INDEX sessions_idle_idx ON sessions ((COALESCE(last_seen_at, started_at)), id)
    WHERE status = 'connected'
    """,
]

BACKWARD = ["DROP INDEX sessions_idle_idx"]


class Migration(migrations.Migration):
    dependencies = [("models", "0006_audit_partitions")]

    initial = False

    operations = [
        ops.AddField(
            model_name="Session",
            name="last_seen_at",
            field=fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
        ),
        ops.RunSQL(FORWARD, reverse_sql=BACKWARD),
    ]
