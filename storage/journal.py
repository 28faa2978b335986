"""Append-only rows of a transaction, written once at its end instead of once per change.

The one writer of ``audit_events`` and ``outbox`` rows: every lifecycle change (the unit of work
of ``storage.state``, the sweep of ``storage.expiry``), every dead letter and every batch of access
decisions (``storage.flush``) goes through the statements below.

Audit entries, outbox events and the users' final rows are what every applied event adds; a unit
of work (``state.unit_of_work``) collects them here and writes them with one set-based statement
each just before the commit, in the order they were produced. Same transaction, same rows, a few
round trips instead of several per event: round trips are what bounds the pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tortoise.backends.base.client import BaseDBAsyncClient

_AUDIT = """
INSERT INTO audit_events (at, occurred_at, user_id, session_id, kind, reason, source, detail)
SELECT now(), t.occurred_at, t.user_id, t.session_id, t.kind, t.reason, t.source, t.detail::jsonb
FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::text[]) WITH ORDINALITY
     AS t(occurred_at, user_id, session_id, kind, reason, source, detail, n)
ORDER BY t.n
"""

_OUTBOX = """
INSERT INTO outbox (created_at, type, event_id, user_id, session_id, reason, occurred_at)
SELECT now(), t.type, gen_random_uuid(), t.user_id, t.session_id, t.reason, t.occurred_at
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[]) WITH ORDINALITY
     AS t(type, user_id, session_id, reason, occurred_at, n)
ORDER BY t.n
"""

_USERS = """
UPDATE users u SET status = t.status, name = t.name, email = t.email,
    connected_at = t.connected_at, disconnected_at = t.disconnected_at, seen_at = t.seen_at,
    logged_out_at = t.logged_out_at, version = t.version, blocked_at = t.blocked_at,
    blocked_reason = t.blocked_reason, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
            $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::bigint[],
            $10::timestamptz[], $11::text[])
     AS t(id, status, name, email, connected_at, disconnected_at, seen_at, logged_out_at, version,
          blocked_at, blocked_reason)
WHERE u.id = t.id
"""

USER_COLUMNS = (
    "id",
    "status",
    "name",
    "email",
    "connected_at",
    "disconnected_at",
    "seen_at",
    "logged_out_at",
    "version",
    "blocked_at",  # storage.rules: State.block / unblock
    "blocked_reason",
)


ACCESS_KIND = "access"
ACCESS_SOURCE = "api"


async def write_access(
    db: BaseDBAsyncClient,
    rows: Sequence[tuple[datetime | None, str | None, str | None, str | None, str]],
) -> None:
    """Journals access decisions, each ``(occurred_at, user_id, session_id, reason, detail)``
    with ``detail`` already JSON-encoded (``storage.flush.access_row``)."""
    await write_audit(db, [(at, u, s, ACCESS_KIND, r, ACCESS_SOURCE, d) for at, u, s, r, d in rows])


@dataclass(slots=True)
class Journal:
    audit: list[tuple[Any, ...]] = field(default_factory=list)
    outbox: list[tuple[str, str, str | None, str | None, datetime]] = field(default_factory=list)
    users: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record_audit(
        self,
        *,
        kind: str,
        source: str,
        user_id: str | None,
        session_id: str | None = None,
        reason: str | None = None,
        occurred_at: datetime | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """One audit entry (CONTRACT §5)."""
        encoded = json.dumps(detail) if detail is not None else None
        self.audit.append((occurred_at, user_id, session_id, kind, reason, source, encoded))

    def record_outbox(
        self,
        event_type: str,
        *,
        user_id: str,
        session_ids: Sequence[str | None] = (None,),
        reason: str | None = None,
        occurred_at: datetime,
    ) -> None:
        """One lifecycle event out per session id, in that order (CONTRACT §7); the implicit
        session (``""``) goes out as ``session_id: null``."""
        self.outbox.extend(
            (event_type, user_id, sid or None, reason, occurred_at) for sid in session_ids
        )

    async def flush(self, db: BaseDBAsyncClient) -> None:
        if self.users:
            rows = list(self.users.values())
            await db.execute_query(_USERS, [[r.get(c) for r in rows] for c in USER_COLUMNS])
        if self.audit:
            await db.execute_query(_AUDIT, [list(col) for col in zip(*self.audit, strict=True)])
        if self.outbox:
            await db.execute_query(_OUTBOX, [list(col) for col in zip(*self.outbox, strict=True)])
        self.users.clear()
        self.audit.clear()
        self.outbox.clear()


async def write_audit(db: BaseDBAsyncClient, rows: Sequence[tuple[Any, ...]]) -> None:
    """Audit rows outside a unit of work (the access journal's flush: decisions, refused-token
    counts, overflow counts), with the same statement: ``(occurred_at, user_id, session_id,
    kind, reason, source, detail JSON)`` each."""
    if rows:
        await db.execute_query(_AUDIT, [list(col) for col in zip(*rows, strict=True)])
