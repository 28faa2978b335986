"""What the expiry sweep's passes (``storage.expiry``: idle users, idle sessions, lifetimes)
share: their result, how a batch reports its users, and the cache eviction after its commit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from storage.cache import Cache
from storage.models import CONNECTED
from storage.rules import State

SAMPLE = 100  # expired user ids a real sweep reports (a dry run reports them all)
# The rules run on the worker's shared event loop: a 5,000-user batch yields to the actors
# applying events every few hundred users instead of holding the loop for its whole CPU time.
YIELD_EVERY = 250


@dataclass(slots=True)
class SweepResult:
    """What one sweep did; ``users`` lists who would be expired (dry run) or a sample (real run).

    ``examined`` counts candidate rows (sessions, or users with the per-user scope), ``expired``
    the users who lost a session to the idle timeout and ``idle_users_disconnected`` those of them
    left without one (with the per-user scope, the same users), ``spared`` the candidates that
    buffered activity kept."""

    dry_run: bool
    now: str
    cutoff: str
    idle_scope: str = "session"
    examined: int = 0
    expired: int = 0
    idle_users_disconnected: int = 0
    spared: int = 0
    sessions_ended: int = 0
    batches: int = 0
    evicted: int = 0
    seconds: float = 0.0
    skipped: bool = False
    lifetime_sessions_ended: int = 0
    lifetime_users_disconnected: int = 0
    flushed: dict[str, Any] | None = None
    users: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def evict(cache: Cache, rows: Sequence[dict[str, Any]]) -> int:
    """Evicts ``user:<id>`` of the touched users unless a newer version is cached already. A row
    with ``status`` connected (another session of the user is still open) is only evicted;
    the others are disconnections, marked gone (``storage.cache.gone_key``)."""
    gone = [(str(r["id"]), int(r["version"])) for r in rows if r.get("status") != CONNECTED]
    kept = [(str(r["id"]), int(r["version"])) for r in rows if r.get("status") == CONNECTED]
    evicted = await cache.evict_many(gone, disconnected=True)
    return evicted + await cache.evict_many(kept, disconnected=False)


def settled(work: State, user_ids: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {"id": u, "version": work.users[u]["version"], "status": work.users[u]["status"]}
        for u in user_ids
    ]


def report(result: SweepResult, expired: list[str], disconnected: list[str]) -> None:
    """Counts a batch's idle users; a dry run lists them all, a real run a sample."""
    result.expired += len(expired)
    result.idle_users_disconnected += len(disconnected)
    if result.dry_run:
        result.users.extend(expired)
        return
    room = SAMPLE - len(result.users)
    if room > 0:
        result.users.extend(expired[:room])


def lock_mode(dry_run: bool) -> str:
    """A dry run holds nothing; a real one skips users busy in another transaction."""
    return "none" if dry_run else "skip"
