"""An API process's buffered decisions and activity, written to Redis in one round trip.

The API (``api.recorder``) only buffers in memory; what it buffered reaches Redis here, in the
formats ``storage.activity`` owns (the access-log list, the refused-token counters, the overflow
count, the activity hashes), so that the API never writes a Redis key itself. One pipeline, no
transaction: after a failure the caller keeps the whole batch and sends it again, so a push cut
short by a dropped connection may count a part twice (touches are maxima, so only the counters
and access entries can); losing decisions would be worse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from storage.activity import AccessLog, ActivityBuffer, RefusedKey
from storage.redis_conn import AsyncClient


@dataclass(slots=True)
class Pending:
    """One push: what the process buffered since the last one."""

    touches: dict[str, float] = field(default_factory=dict)
    sessions: dict[tuple[str, str], float] = field(default_factory=dict)
    entries: list[str] = field(default_factory=list)
    refused: dict[RefusedKey, int] = field(default_factory=dict)
    unreported: int = 0  # decisions this process dropped and has not yet counted in Redis

    def empty(self) -> bool:
        return not (
            self.touches or self.sessions or self.entries or self.refused or self.unreported
        )


async def push(
    client: AsyncClient, access_log: AccessLog, activity: ActivityBuffer, pending: Pending
) -> int:
    """Writes ``pending``; returns how many access-log entries went past the list's cap (kept
    out of the list and counted there as overflow by ``AccessLog``)."""
    async with client.pipeline(transaction=False) as pipe:
        appends = await access_log.queue_append(pipe, pending.entries) if pending.entries else 0
        await access_log.queue_refused(pipe, pending.refused)
        if pending.unreported:
            access_log.queue_overflow(pipe, "api", pending.unreported)
        sessions = [(u, s, at) for (u, s), at in pending.sessions.items()]
        await activity.queue_touches(pipe, pending.touches.items(), sessions)
        results = await pipe.execute()
    return sum(int(n) for n in results[:appends])
