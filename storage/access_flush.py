"""The access log's half of the flush (``storage.flush``): buffered decisions reach
``audit_events``.

The oldest page of the list (``AccessLog``) is read, journaled into ``audit_events`` with one
multi-row ``INSERT``, and trimmed off after the commit (a crash in between journals that one page
twice on the next flush, never loses it). Memory is one page, whatever the backlog; one flush
drains for at most ``DRAIN_BUDGET_S`` so that it stays well inside the activity lock's TTL, and
the next tick goes on. Then the refused-token counts of closed minutes and the overflow counts are
journaled, each taken away only by what was written.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tortoise.backends.base.client import BaseDBAsyncClient

from storage.activity import REFUSED_DECISION, AccessLog, RefusedKey
from storage.journal import write_audit

if TYPE_CHECKING:
    from storage.flush import FlushResult

log = logging.getLogger(__name__)

ACCESS_KIND = "access"
OVERFLOW_KIND = "access_log_overflow"
DRAIN_BUDGET_S = 20.0


def _when(value: Any) -> datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, tz=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _text(value: Any, limit: int) -> str | None:
    if value is None or value == "":
        return None
    return str(value)[:limit]


AuditRow = tuple[datetime | None, str | None, str | None, str, str | None, str, str]


def access_row(entry: dict[str, Any]) -> AuditRow:
    """One access decision as audit columns. Only known fields are kept: an entry never carries a
    token or a header into the journal (CONTRACT §5). Over-long values are cut to the column size
    so that one odd entry cannot block a whole batch."""
    detail: dict[str, Any] = {
        "decision": _text(entry.get("decision"), 32),
        "route": _text(entry.get("route"), 256),
    }
    if isinstance(entry.get("status"), int):
        detail["status"] = entry["status"]
    return (
        _when(entry.get("at")),
        _text(entry.get("user_id"), 128),
        _text(entry.get("session_id"), 128),
        ACCESS_KIND,
        _text(entry.get("reason"), 64),
        "api",
        json.dumps(detail, separators=(",", ":")),
    )


def refused_row(key: RefusedKey, count: int) -> AuditRow:
    """One row for all the refused tokens of one (minute, route, reason, client address)."""
    minute, route, reason, client_address = key
    detail = {
        "decision": REFUSED_DECISION,
        "route": route[:256],
        "client": client_address[:64] or None,
        "count": count,
    }
    at = datetime.fromtimestamp(minute, tz=UTC)
    return (at, None, None, ACCESS_KIND, reason[:64] or None, "api", json.dumps(detail))


async def drain_access_log(
    access_log: AccessLog,
    db: BaseDBAsyncClient,
    result: FlushResult,
    *,
    batch_size: int,
    budget_s: float = DRAIN_BUDGET_S,
    now: float | None = None,
) -> None:
    """Pages of ``batch_size`` entries, then the refused counts, then the overflow counts."""
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        page = await access_log.read_page(batch_size)
        if page is None:
            break
        await write_audit(db, [access_row(e) for e in page.entries])
        await access_log.ack(page)
        result.access_entries += len(page.entries)
        result.access_pages += 1
        result.batches += 1
    result.access_backlog = await access_log.backlog()
    closed = await access_log.closed_refused(time.time() if now is None else now)
    for start in range(0, len(closed), batch_size):
        part = closed[start : start + batch_size]
        counts: dict[RefusedKey, int] = {}
        for _, _, key, n in part:  # one row per key, whichever shards counted it
            counts[key] = counts.get(key, 0) + n
        await write_audit(db, [refused_row(key, n) for key, n in counts.items()])
        await access_log.ack_refused([(hash_key, field, n) for hash_key, field, _, n in part])
        result.refused_rows += len(counts)
        result.refused_count += sum(counts.values())
    overflow = await access_log.overflow()
    if overflow:
        dropped: dict[str, int] = {}
        for _, buffer, n in overflow:
            dropped[buffer] = dropped.get(buffer, 0) + n
        rows: list[AuditRow] = [
            (None, None, None, OVERFLOW_KIND, "cap", "api", json.dumps({"dropped": n, "buffer": b}))
            for b, n in sorted(dropped.items())
        ]
        await write_audit(db, rows)
        await access_log.ack_overflow(overflow)
        result.overflow_count += sum(dropped.values())
        log.warning("access log over its cap: entries counted, not stored", extra=dropped)
