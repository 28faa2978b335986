"""The API's per-process buffer of activity and access decisions (see ``api.access``).

Requests only append to memory here; a background task pushes the batch to Redis, where the flush
job (``storage.flush``) picks it up. Both buffers are bounded:
- this process keeps at most ``max_entries`` decisions / ``max_bytes`` of them while Redis is
  down; past that a decision is counted (metric, then ``audit:access:overflow`` once Redis is
  back), not stored;
- the Redis list has caps of its own (``storage.activity.AccessLog``) for while PostgreSQL is down.
Refused tokens (401) are never buffered one by one: they are counted per (minute, route, reason,
client address), so a flood of garbage tokens costs a few counters, not a row each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from sanic import Request

from api.metrics import Counter
from storage.activity import REFUSED_DECISION, AccessLog, ActivityBuffer, RefusedKey
from storage.decision_push import Pending, push
from storage.redis_conn import AsyncClient

log = logging.getLogger(__name__)


def current_client() -> str:
    """The address of the request being handled (``""`` outside a request, e.g. gRPC)."""
    try:
        request = Request.get_current()
    except Exception:  # outside a Sanic request
        return ""
    return str(request.remote_addr or request.ip or "")


class Recorder:
    """Per-process buffer of activity and access decisions, pushed to Redis every ``interval_s``
    (or sooner when ``max_batch`` decisions wait) in one pipeline. A graceful stop flushes it; a
    killed process loses at most one interval of it."""

    def __init__(
        self,
        client: AsyncClient,
        activity: ActivityBuffer,
        *,
        access_log: AccessLog | None = None,
        overflow: Counter | None = None,
        interval_s: float = 0.1,
        max_batch: int = 1000,
        max_backlog: int = 200_000,
        max_bytes: int = 64 * 2**20,
        max_refused_keys: int = 10_000,
        client_address: Callable[[], str] = current_client,
    ) -> None:
        self.client = client
        self.activity = activity
        self.access_log = access_log or AccessLog(client)
        self.overflow = overflow
        self.interval_s = interval_s
        self.max_batch = max_batch
        self.max_backlog = max_backlog
        self.max_bytes = max_bytes
        self.max_refused_keys = max_refused_keys
        self.client_address = client_address
        self.dropped = 0
        self._unreported = 0  # dropped here, not yet counted in Redis
        self._touches: dict[str, float] = {}
        self._session_touches: dict[tuple[str, str], float] = {}
        self._entries: list[str] = []
        self._bytes = 0
        self._refused: dict[RefusedKey, int] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._warned_at = float("-inf")

    def touch(self, user_id: str, session_id: str, at: float) -> None:
        """A granted request of a user's session (``""``: the implicit one): both levels."""
        if at > self._touches.get(user_id, 0.0):
            self._touches[user_id] = at
        key = (user_id, session_id)
        if at > self._session_touches.get(key, 0.0):
            self._session_touches[key] = at

    def pending(self, user_id: str, session_id: str | None = None) -> float | None:
        """This process's newest request not yet pushed: the user's, or one session's."""
        if session_id is None:
            return self._touches.get(user_id)
        return self._session_touches.get((user_id, session_id))

    def record(
        self,
        at: float,
        user_id: str | None,
        session_id: str | None,
        decision: str,
        reason: str | None,
        route: str,
    ) -> None:
        if decision == REFUSED_DECISION:
            self._count_refused(at, route, reason or "")
            return
        encoded = self.access_log.encode(at, user_id, session_id, decision, reason, route)
        if len(self._entries) >= self.max_backlog or self._bytes + len(encoded) > self.max_bytes:
            self._drop(1)
            return
        self._entries.append(encoded)
        self._bytes += len(encoded)
        if len(self._entries) >= self.max_batch:
            self._wake.set()

    def _count_refused(self, at: float, route: str, reason: str) -> None:
        key: RefusedKey = (int(at // 60) * 60, route, reason, self.client_address())
        if key not in self._refused and len(self._refused) >= self.max_refused_keys:
            key = (key[0], route, reason, "*")
        self._refused[key] = self._refused.get(key, 0) + 1

    def _drop(self, n: int) -> None:
        self.dropped += n
        self._unreported += n
        if self.overflow is not None:
            self.overflow.inc("api", by=n)

    async def flush(self) -> None:
        touches, self._touches = self._touches, {}
        sessions, self._session_touches = self._session_touches, {}
        entries, self._entries = self._entries, []
        refused, self._refused = self._refused, {}
        unreported, self._unreported = self._unreported, 0
        self._bytes = 0
        pending = Pending(touches, sessions, entries, refused, unreported)
        if pending.empty():
            return
        try:
            over_cap = await push(self.client, self.access_log, self.activity, pending)
        except Exception as exc:
            self._keep(touches, sessions, entries, refused, unreported, exc)
            return
        if over_cap and self.overflow is not None:
            self.overflow.inc("redis", by=over_cap)

    def _keep(
        self,
        touches: dict[str, float],
        sessions: dict[tuple[str, str], float],
        entries: list[str],
        refused: dict[RefusedKey, int],
        unreported: int,
        exc: Exception,
    ) -> None:
        """A failed push: everything goes back for the next try, within the caps."""
        for user_id, at in touches.items():
            if at > self._touches.get(user_id, 0.0):
                self._touches[user_id] = at
        for pair, at in sessions.items():
            if at > self._session_touches.get(pair, 0.0):
                self._session_touches[pair] = at
        for key, n in refused.items():
            if key not in self._refused and len(self._refused) >= self.max_refused_keys:
                key = (key[0], key[1], key[2], "*")
            self._refused[key] = self._refused.get(key, 0) + n
        self._unreported += unreported
        backlog = entries + self._entries
        size = sum(len(e) for e in backlog)
        cut = 0
        while cut < len(backlog) and (
            len(backlog) - cut > self.max_backlog or size > self.max_bytes
        ):
            size -= len(backlog[cut])
            cut += 1
        if cut:
            self._drop(cut)  # the oldest go: the newest are the likelier to matter next
        self._entries = backlog[cut:]
        self._bytes = size
        if self._should_warn():
            log.warning(
                "activity/access-log flush failed; kept for the next try",
                extra={
                    "error": str(exc)[:300],
                    "waiting": len(self._entries),
                    "dropped": self.dropped,
                },
            )

    def _should_warn(self) -> bool:
        """While Redis is down a flush fails every interval: one warning per 10 s is enough."""
        now = time.monotonic()
        if now - self._warned_at < 10.0:
            return False
        self._warned_at = now
        return True

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()
            self._wake.clear()
            await self.flush()

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="recorder")

    async def stop(self) -> None:
        """Lets the loop end after one last flush instead of cancelling it mid-flush (a
        cancelled ``wait_for`` could leave Python 3.11's task stuck in ``cancelling``)."""
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            await self._task
            self._task = None
        await self.flush()
