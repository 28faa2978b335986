"""Tortoise models: the schema is owned by the migrations generated from these classes."""

from __future__ import annotations

from tortoise import fields
from tortoise.indexes import Index, PartialIndex
from tortoise.models import Model

CONNECTED = "connected"
DISCONNECTED = "disconnected"
ENDED = "ended"


class User(Model):
    """One row a user; ``status`` is derived from the user's sessions in the same transaction."""

    id = fields.CharField(pk=True, max_length=128)
    name = fields.CharField(max_length=256, null=True)
    email = fields.CharField(max_length=320, null=True)
    status = fields.CharField(max_length=16, default=DISCONNECTED)
    connected_at = fields.DatetimeField(null=True)
    disconnected_at = fields.DatetimeField(null=True)
    last_activity_at = fields.DatetimeField(null=True)
    # Newest sign of life (connect or request): the idle sweep is a range scan on it.
    seen_at = fields.DatetimeField(null=True)
    # Newest "logged out everywhere" time: fences connects that happened before it, and tokens
    # issued before it (the token fence, CONTRACT §8).
    logged_out_at = fields.DatetimeField(null=True)
    # Set while the user is blocked (admin route, Keycloak disable/delete): logins are refused.
    blocked_at = fields.DatetimeField(null=True)
    blocked_reason = fields.CharField(max_length=32, null=True)
    # Bumped on every state change; the Redis cache refuses to go back to an older version.
    version = fields.BigIntField(default=0)
    created_at = fields.DatetimeField(auto_now_add=True)
    updated_at = fields.DatetimeField(auto_now=True)

    class Meta:
        table = "users"
        indexes = (
            PartialIndex(
                fields=("seen_at",), condition={"status": CONNECTED}, name="users_idle_idx"
            ),
            # The API's cache reconciler reads the users changed in the last seconds.
            Index(fields=("updated_at",), name="users_updated_idx"),
        )


class Session(Model):
    """A device's session; ``session_id`` is ``""`` for the implicit one of events without an id."""

    id = fields.BigIntField(pk=True)
    user: fields.ForeignKeyRelation[User] = fields.ForeignKeyField(
        "models.User", related_name="sessions", on_delete=fields.CASCADE
    )
    session_id = fields.CharField(max_length=128)
    status = fields.CharField(max_length=16, default=CONNECTED)
    started_at = fields.DatetimeField()
    ended_at = fields.DatetimeField(null=True)
    end_reason = fields.CharField(max_length=32, null=True)
    # Time of the newest event applied to this session: older events never undo it.
    last_event_at = fields.DatetimeField()
    # Newest sign of life (login or granted request, moved by the activity flush): the
    # per-session idle rule measures from it (``storage.forced.session_idle``). The sweep's index
    # on it, ``sessions_idle_idx``, is migration 0007's (an expression index).
    last_seen_at = fields.DatetimeField(null=True)
    ip_address = fields.CharField(max_length=64, null=True)
    source = fields.CharField(max_length=32, default="auth")

    class Meta:
        table = "sessions"
        unique_together = (("user", "session_id"),)
        indexes = (
            PartialIndex(
                fields=("started_at",), condition={"status": CONNECTED}, name="sessions_open_idx"
            ),
            # ``DELETE /admin/sessions/<session_id>`` without ``user_id`` finds the owner by id.
            Index(fields=("session_id",), name="sessions_session_id_idx"),
        )


class ProcessedEvent(Model):
    """De-duplication ledger: an event key seen once is a no-op the second time."""

    key = fields.CharField(pk=True, max_length=300)
    user_id = fields.CharField(max_length=128)
    processed_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "processed_events"
        indexes = (Index(fields=("processed_at",), name="processed_events_at_idx"),)


class EventReceipt(Model):
    """The stamps an event without a time of its own was first given (``storage.receipts``)."""

    key = fields.CharField(pk=True, max_length=300)
    received_at = fields.DatetimeField()
    stamped_at = fields.DatetimeField()

    class Meta:
        table = "event_receipts"
        indexes = (Index(fields=("received_at",), name="event_receipts_at_idx"),)


class AuditEvent(Model):
    """Append-only journal of lifecycle changes and access decisions (CONTRACT §5).

    Partitioned by migration 0006 (LIST on ``kind``: access / lifecycle, then RANGE on ``at``:
    one partition a UTC day; ``storage.retention`` creates and drops them). PostgreSQL requires
    the partition keys in the primary key, so the table's key is ``(id, kind, at)``; Tortoise
    knows ``id`` as the key, which stays unique (one sequence feeds every partition). The schema
    is the migrations' (``RunSQL``): generate_schemas would build an unpartitioned table."""

    id = fields.BigIntField(pk=True)
    at = fields.DatetimeField(auto_now_add=True)
    occurred_at = fields.DatetimeField(null=True)
    user_id = fields.CharField(max_length=128, null=True)
    session_id = fields.CharField(max_length=128, null=True)
    kind = fields.CharField(max_length=32)
    reason = fields.CharField(max_length=64, null=True)
    source = fields.CharField(max_length=32)
    detail: fields.Field[dict[str, object] | None] = fields.JSONField(null=True)

    class Meta:
        table = "audit_events"
        indexes = (
            Index(fields=("user_id", "at"), name="audit_user_at_idx"),
            Index(fields=("at",), name="audit_at_idx"),
        )


class OutboxEvent(Model):
    """A lifecycle event out (CONTRACT §7), written in the transaction of its state change and
    published by the relay (``actors.outbox``); ``sent_at`` is set once the broker confirmed it."""

    id = fields.BigIntField(pk=True)
    created_at = fields.DatetimeField(auto_now_add=True)
    type = fields.CharField(max_length=32)
    event_id = fields.UUIDField(unique=True)
    user_id = fields.CharField(max_length=128)
    session_id = fields.CharField(max_length=128, null=True)
    reason = fields.CharField(max_length=32, null=True)
    occurred_at = fields.DatetimeField()
    sent_at = fields.DatetimeField(null=True)

    class Meta:
        table = "outbox"
        indexes = (
            # The relay's scan (``sent_at IS NULL ORDER BY id``), the purge of old sent rows, and
            # the per-user ordering check. Plain indexes: sent rows are purged after a retention.
            Index(fields=("sent_at", "id"), name="outbox_sent_idx"),
            Index(fields=("user_id", "sent_at", "id"), name="outbox_user_sent_idx"),
        )
