"""The API's per-process buffer of activity and access decisions (see ``api.access``).

Requests only append to memory here; a background task pushes the batch to Redis, where the flush
job (``storage.flush``) picks it up. Kept apart from the decision logic so that the buffering and
the decision can change independently.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import UTC, datetime

import redis.asyncio as aioredis

from storage.activity import ACCESS_LOG_KEY, ActivityBuffer

log = logging.getLogger(__name__)


def iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC).isoformat()


class Recorder:
    """Per-process buffer of activity and access decisions, pushed to Redis every ``interval_s``
    (or sooner when ``max_batch`` decisions wait) in one pipeline. A graceful stop flushes it; a
    killed process loses at most one interval of it."""

    def __init__(
        self,
        client: aioredis.Redis,
        activity: ActivityBuffer,
        *,
        interval_s: float = 0.1,
        max_batch: int = 1000,
        max_backlog: int = 200_000,
    ) -> None:
        self.client = client
        self.activity = activity
        self.interval_s = interval_s
        self.max_batch = max_batch
        self.max_backlog = max_backlog
        self.dropped = 0
        self._touches: dict[str, float] = {}
        self._entries: list[tuple[float, str | None, str | None, str, str | None, str]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._tails: dict[tuple[str | None, str | None, str, str | None, str], str] = {}
        self._warned_at = float("-inf")

    def touch(self, user_id: str, at: float) -> None:
        if at > self._touches.get(user_id, 0.0):
            self._touches[user_id] = at

    def pending(self, user_id: str) -> float | None:
        return self._touches.get(user_id)

    def record(
        self,
        at: float,
        user_id: str | None,
        session_id: str | None,
        decision: str,
        reason: str | None,
        route: str,
    ) -> None:
        self._entries.append((at, user_id, session_id, decision, reason, route))
        if len(self._entries) >= self.max_batch:
            self._wake.set()

    def encode(self, entry: tuple[float, str | None, str | None, str, str | None, str]) -> str:
        """``{"at", "user_id", "session_id", "decision", "reason", "route"}`` as compact JSON; all
        but the time repeat a lot, so their encoding is remembered."""
        tail_key = entry[1:]
        tail = self._tails.get(tail_key)
        if tail is None:
            user_id, session_id, decision, reason, route = tail_key
            tail = json.dumps(
                {
                    "user_id": user_id,
                    "session_id": session_id,
                    "decision": decision,
                    "reason": reason,
                    "route": route,
                },
                separators=(",", ":"),
            )[1:]
            if len(self._tails) >= 10_000:
                self._tails.clear()
            self._tails[tail_key] = tail
        return f'{{"at":"{iso(entry[0])}",{tail}'

    async def flush(self) -> None:
        touches, self._touches = self._touches, {}
        entries, self._entries = self._entries, []
        if not touches and not entries:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                if entries:
                    pipe.rpush(ACCESS_LOG_KEY, *[self.encode(e) for e in entries])
                await self.activity.queue_touches(pipe, touches.items())
                await pipe.execute()
        except Exception as exc:
            for user_id, at in touches.items():
                self.touch(user_id, at)
            backlog = entries + self._entries
            if len(backlog) > self.max_backlog:
                self.dropped += len(backlog) - self.max_backlog
                backlog = backlog[-self.max_backlog :]
            self._entries = backlog
            if self._should_warn():
                log.warning(
                    "activity/access-log flush failed; kept for the next try",
                    extra={
                        "error": str(exc)[:300],
                        "waiting": len(backlog),
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
