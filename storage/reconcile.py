"""Redis catches up with PostgreSQL, from where it last did, whatever was down in between.

A worker, an admin route or the sweep commits a change, then syncs ``user:<id>``. If that sync
never lands (Redis unreachable or paused past the writer's retries, a network split that leaves
Redis's data in place), an API that reads that Redis later would grant on the entry of a user
who logged out: the one way to a wrong 200. So one API process per period (a Redis lock elects
it) takes a *turn*: it reads the users whose version changed since the last turn that succeeded
and brings each cached entry back to its row. A failed eviction needs no retry of its own: the
change it follows is in the next turn, whoever made it.

**Which changes a turn reads (the high-water mark).** Rows commit out of the order of any value
taken inside their transactions (a timestamp, a sequence): a transaction that took ``t`` can
commit after one that took ``t + 5 s``, so "rows with ``updated_at`` past my mark" misses it, and
no window is safe without a bound on transaction length nobody enforces. The mark here is a
transaction id horizon instead. A trigger (migration ``0004_reconcile``) stamps each version
change with ``pg_current_xact_id()`` in ``users.change_xid``. A turn first reads
``pg_snapshot_xmin(pg_current_snapshot())``, the oldest transaction still running: every
transaction with a smaller id has ended, so its changes are visible to everything the turn reads
afterwards, and every change not visible yet belongs to a transaction whose id is at least that
horizon (ids are handed out in increasing order; one still running is at least the oldest one
running; one that starts later gets a larger id). So a turn that reads ``change_xid >= start``
and succeeds may store its horizon as the next ``start``, and no change is ever skipped, however
long a transaction took or in which order they committed. The price is overlap: rows changed by
transactions at or after the horizon are read again by the next turn (a no-op for them).
A long write transaction anywhere in the cluster holds the horizon back and makes turns re-read
more, never less. (``updated_at`` is taken by the same trigger at the row's write with
``clock_timestamp()``, not at transaction start, but nothing here depends on it.)

**Where a turn starts.** The horizon of the last successful turn is stored twice: in PostgreSQL
(``cache_reconcile``, committed first) and in Redis (``MARK_KEY``, written after the evictions
that it vouches for; on a cluster once per shard tag, ``storage.keys``, read as the lowest).
A turn reads both:
- equal (the usual case), or Redis's lower: start from Redis's. A Redis restored from a snapshot
  or failed over to a lagging replica carries the mark of the state it holds, so the turn goes
  back exactly as far as that Redis has fallen behind;
- Redis's higher than PostgreSQL's: PostgreSQL went backwards (restored, or failed over to a
  standby that had not received everything); no range of changes describes what it lost;
- no mark in Redis (an empty or new Redis, or one from before this version):
the last two compare every cached ``user:<id>`` and ``gone:<id>`` with its row (``SCAN``, a
thousand keys at a time), and the turn sets the mark to its horizon.

**What a turn does with each row** (``storage.cache``): an entry older than the row is evicted
(with a ``gone:`` mark if the row is disconnected, so a lost login must not stay refused
either); an entry at the row's version is left alone; an entry *newer* than the row cannot come
from this PostgreSQL (Redis is only written after a commit), unless it raced the read: so those
users are read again, and an entry still newer than a row read after it was seen is reset to the
row (versions that went backwards), compare-and-set on the version found.

The API runs a turn of its own before it trusts a Redis it could not reach (``api.access``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster

from storage.cache import Ahead, Cache, RowState, user_key
from storage.db import conn
from storage.keys import SINGLE, key_slot
from storage.models import CONNECTED
from storage.redis_conn import mget, scan

LOCK_KEY: Final = "sessiond:reconcile:lock"
MARK_KEY: Final = SINGLE.reconcile_marks[0]
STATE: Final = "cache"
PAGE: Final = 5000
SCAN_COUNT: Final = 1000

_HORIZON = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS xmin"
_STORED = "SELECT hwm::text AS hwm FROM cache_reconcile WHERE name = $1"
_CHANGED = """
SELECT id, version, status, change_xid::text AS xid FROM users
WHERE (change_xid, id) > ($1::text::xid8, $2::text)
ORDER BY change_xid, id
LIMIT $3
"""
_ROWS = "SELECT id, version, status FROM users WHERE id = ANY($1::text[])"
_SAVE = """
INSERT INTO cache_reconcile (name, hwm, turns, updated_at) VALUES ($1, $2::text::xid8, 1, now())
ON CONFLICT (name) DO UPDATE
SET hwm = GREATEST(cache_reconcile.hwm, EXCLUDED.hwm), turns = cache_reconcile.turns + 1,
    updated_at = now()
"""


@dataclass(frozen=True, slots=True)
class Reconciled:
    checked: int
    evicted: int
    reset: int = 0
    full: bool = False
    start: int | None = None
    horizon: int = 0

    @property
    def repaired(self) -> int:
        return self.evicted + self.reset


def _row(r: dict[str, Any]) -> RowState:
    return RowState(str(r["id"]), int(r["version"]), r["status"] == CONNECTED)


async def _read_rows(user_ids: Sequence[str]) -> dict[str, RowState]:
    rows = await conn().execute_query_dict(_ROWS, [list(user_ids)])
    return {str(r["id"]): _row(r) for r in rows}


async def _settle(cache: Cache, rows: Sequence[RowState]) -> tuple[int, int]:
    """Brings the cached entries of these rows back to them; returns (evicted, reset)."""
    evicted, ahead = await cache.reconcile(rows)
    if not ahead:
        return evicted, 0
    # Read again, after Redis was seen ahead: a commit that raced the first read shows now.
    fresh = await _read_rows([a.user_id for a in ahead])
    behind: list[tuple[Ahead, RowState]] = []
    for a in ahead:
        row = fresh.get(a.user_id, RowState(a.user_id, -1, False))
        if row.version < a.cached:
            behind.append((a, row))
    return evicted, await cache.reset(behind)


async def _changes(cache: Cache, start: int) -> tuple[int, int, int]:
    """Every user whose version changed in a transaction at or after ``start``, page by page."""
    checked = evicted = reset = 0
    after: tuple[str, str] = (str(start), "")
    while True:
        page = await conn().execute_query_dict(_CHANGED, [after[0], after[1], PAGE])
        if not page:
            return checked, evicted, reset
        done = await _settle(cache, [_row(r) for r in page])
        checked, evicted, reset = checked + len(page), evicted + done[0], reset + done[1]
        if len(page) < PAGE:
            return checked, evicted, reset
        after = (str(page[-1]["xid"]), str(page[-1]["id"]))


def _user_id(key: str, cache: Cache) -> str | None:
    if key.startswith("user:"):
        return key.removeprefix("user:")
    return cache.layout.gone_user_id(key)


async def _everything(cache: Cache) -> tuple[int, int, int]:
    """Every cached ``user:<id>`` and gone mark against its row (unknown users: version -1, so
    reset); on a cluster, every master's."""
    checked = evicted = reset = 0
    for pattern in (user_key("*"), cache.layout.gone_pattern):
        async for keys in scan(cache.client, pattern, SCAN_COUNT):
            ids = sorted({uid for uid in (_user_id(k, cache) for k in keys) if uid is not None})
            if ids:
                found = await _read_rows(ids)
                rows = [found.get(uid, RowState(uid, -1, False)) for uid in ids]
                done = await _settle(cache, rows)
                checked, evicted, reset = checked + len(ids), evicted + done[0], reset + done[1]
    return checked, evicted, reset


async def _marks(cache: Cache) -> tuple[int, int] | None:
    """The lowest and the highest mark (the turn starts from the lowest; any above
    PostgreSQL's means PostgreSQL went backwards), ``None`` when one is missing. On a
    cluster there is one mark per shard tag, and each master's marks travel with its data: a
    master failed over to a lagging replica brings back its older marks, so the turn goes back
    as far as that master fell behind. A master that holds none of the marks (more masters than
    shards, or an uneven slot split) could fall behind unseen: then no mark is trusted."""
    marks = cache.layout.reconcile_marks
    if not await _covered(cache, marks):
        return None
    raw = await mget(cache.client, list(marks))
    if any(value is None for value in raw):
        return None
    values = [int(value) for value in raw]
    return min(values), max(values)


async def _covered(cache: Cache, marks: Sequence[str]) -> bool:
    client = cache.client
    if not cache.layout.cluster or not isinstance(client, RedisCluster):
        return True
    await client.initialize()  # the slot map (a no-op once loaded)
    owners = {client.nodes_manager.get_node_from_slot(key_slot(m)).name for m in marks}
    return owners >= {node.name for node in client.get_primaries()}


async def reconcile(cache: Cache) -> Reconciled:
    """One turn, from where the last successful one got to (see the module docstring). Any
    failure (Redis or PostgreSQL unreachable) raises before the mark moves: the next turn
    covers the same changes again."""
    marks = await _marks(cache)
    db = conn()
    stored_rows = await db.execute_query_dict(_STORED, [STATE])
    horizon = int((await db.execute_query_dict(_HORIZON))[0]["xmin"])
    stored = int(stored_rows[0]["hwm"]) if stored_rows else None
    full = marks is None or stored is None or marks[1] > stored
    start: int | None = None
    if full:
        checked, evicted, reset = await _everything(cache)
    else:
        assert marks is not None
        start = marks[0]
        checked, evicted, reset = await _changes(cache, start)
    await db.execute_query(_SAVE, [STATE, str(horizon)])
    for key in cache.layout.reconcile_marks:
        await cache.mark(key, horizon, force=full)
    return Reconciled(checked, evicted, reset, full, start, horizon)


async def take_turn(cache: Cache, *, period_s: float) -> bool:
    """True for the one process that reconciles in this period (``SET NX PX``); the lock lapses
    on its own, so a process that dies does not block the next period."""
    return bool(await cache.client.set(LOCK_KEY, "1", nx=True, px=max(int(period_s * 1000), 1)))
