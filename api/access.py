"""The access decision (CONTRACT §2): is the token's user, and its session, alive right now?

Hot path (a cache hit of an active user): one Redis ``GET user:<id>``; the pending-activity
``HGET`` only when the cached times alone say "idle". A miss reads ``gone:<id>`` first: a user
whose logout Redis saw is refused without a PostgreSQL query.

Idle timeout (CONTRACT §8): by default each session is measured on its own, from the newest sign
of life of the token's session (``sid``; a token without one is the implicit session's, that of
events without ``session_id``): the cached ``session_seen``, then this process's buffer, then the
``activity:sessions`` hash. Only when all three say "idle" is PostgreSQL asked before refusing:
the flush moves a time from the hash to the row and the cache, and a state change's snapshot read
before that move may have replaced the cache's since, so the row is the one place a time still
is. A token without ``sid`` of a user with no implicit session open, an entry cached before the
sessions had times, and ``SESSIOND_IDLE_SCOPE=user`` are measured per user (the user's newest
request keeps all of their sessions alive).

Writes never happen per request: granted requests and decisions go to a per-process ``Recorder``
(``api.recorder``) that pushes them to Redis in batches (``activity`` hash, ``audit:access``
list), from where the flush job moves them to PostgreSQL.

Degraded modes (never a wrong 200):
- Redis unreachable: the decision comes from PostgreSQL, the source of truth (slower, correct).
  After one failure Redis is bypassed and probed in the background until it answers again, so
  requests do not each pay a connection timeout. When PostgreSQL's times alone say "idle", the
  pending activity that only Redis knows cannot be read: 503, not a guess.
- Redis answering again is trusted only after a reconciler turn has caught it up with
  PostgreSQL; a refill refused by the version guard is a stale read, never served
  (``api.cachetrust``).
- PostgreSQL unreachable: a cache hit still answers; a miss is 503 (``DependencyUnavailable``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

from api.cachetrust import REDIS_UNAVAILABLE, RedisTrust, refill
from api.metrics import Metrics
from api.recorder import Recorder
from api.tokens import Principal, TokenError, TokenValidator, predates_fence
from sessiond.config import IdleScope
from sessiond.errors import DependencyUnavailable, SessiondError
from storage.activity import IMPLICIT_SESSION, ActivityBuffer
from storage.block import gone_reason
from storage.cache import Cache, UserSnapshot
from storage.db import DB_CONNECTION_ERRORS
from storage.state import load_snapshot

log = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Epoch seconds; injectable so that idle timeouts can be tested without waiting."""

GRANTED: Final = "granted"
FORBIDDEN: Final = "forbidden"
INVALID_TOKEN: Final = "invalid_token"  # noqa: S105 (a decision name)
CONNECTED: Final = "connected"
_TIME_FIELDS: Final = ("seen_at", "last_activity_at", "connected_at")
_STARTED: Final = "_session_started_epoch"  # parsed once per cached entry, never sent out
_FENCE: Final = "_logged_out_epoch"
_SEEN: Final = "_session_seen_epoch"

DB_UNAVAILABLE: Final = (OSError, TimeoutError, *DB_CONNECTION_ERRORS)


class Denied(SessiondError):
    """A valid token whose user or session may not pass; ``reason`` is a stable code (403)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Grant:
    """A granted request: who, and the user's cached profile (the ``user:<id>`` JSON as a dict)."""

    __slots__ = ("principal", "user")

    def __init__(self, principal: Principal, user: dict[str, Any]) -> None:
        self.principal = principal
        self.user = user


def _epoch(value: Any) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value).timestamp()


def iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC).isoformat()


class UserLoader:
    """Coalesces the ``GET user:<id>`` of requests that arrive in the same event-loop turn into
    one ``MGET`` (requests for the same user share one slot; a cluster's split per slot), so
    Redis client work is paid per batch rather than per request. Each request still reads
    after it arrived: no staleness."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self._pending: dict[str, asyncio.Future[bytes | None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self, user_id: str) -> asyncio.Future[bytes | None]:
        future = self._pending.get(user_id)
        if future is None:
            if not self._pending:
                if self._loop is None:
                    self._loop = asyncio.get_running_loop()
                self._loop.call_soon(self._dispatch)
            future = self._pending[user_id] = asyncio.get_running_loop().create_future()
        return future

    def _dispatch(self) -> None:
        batch, self._pending = self._pending, {}
        assert self._loop is not None
        self._loop.create_task(self._fetch(batch))

    async def _fetch(self, batch: dict[str, asyncio.Future[bytes | None]]) -> None:
        try:
            values = await self.cache.raw_many(list(batch))
        except Exception as exc:
            for future in batch.values():
                if not future.done():
                    future.set_exception(exc)
            return
        for future, value in zip(batch.values(), values, strict=True):
            if not future.done():
                future.set_result(value)


class AccessControl:
    """Token check + active-user check + bookkeeping, shared by every protected route."""

    def __init__(
        self,
        *,
        tokens: TokenValidator,
        cache: Cache,
        activity: ActivityBuffer,
        recorder: Recorder,
        metrics: Metrics,
        clock: Clock,
        idle_timeout_s: float,
        session_max_s: float | None = None,
        idle_scope: IdleScope = "session",
    ) -> None:
        self.tokens = tokens
        self.cache = cache
        self.redis = cache.client
        self.activity = activity
        self.recorder = recorder
        self.loader = UserLoader(cache)
        self._parsed: dict[bytes, tuple[dict[str, Any], float | None]] = {}
        self.metrics = metrics
        self.clock = clock
        self.idle_timeout_s = idle_timeout_s
        self.per_session = idle_scope == "session"
        self.session_max_s = session_max_s or None
        self._decisions = metrics.decisions
        self._cache_hits = metrics.cache
        self.trust = RedisTrust(cache.client)

    @property
    def redis_down(self) -> bool:
        """True while Redis is bypassed after a failure (until it answers and caught up)."""
        return self.trust.down

    @property
    def _redis_down(self) -> bool:
        return self.trust.down

    def _redis_failed(self, exc: BaseException) -> None:
        self.trust.failed(exc)

    async def close(self) -> None:
        await self.trust.close()

    async def _load(self, user_id: str, *, refill_cache: bool = False) -> UserSnapshot | None:
        """The row (``None``: unknown user); ``refill_cache`` on a miss of a usable Redis."""
        try:
            snapshot = await load_snapshot(user_id)
        except DB_UNAVAILABLE as exc:
            raise DependencyUnavailable(f"postgres: {type(exc).__name__}") from exc
        if not refill_cache or snapshot is None:
            return snapshot
        return await refill(self.cache, self.trust, snapshot, self._load)

    async def _cached(self, user_id: str) -> tuple[bool, bytes | None]:
        """``(usable, raw)``: whether Redis answered, and the cached bytes (``None``: a miss)."""
        if self._redis_down:
            return False, None
        try:
            return True, await self.loader.get(user_id)
        except REDIS_UNAVAILABLE as exc:
            self._redis_failed(exc)
            return False, None

    async def _gone(self, user_id: str) -> str | None:
        """On a miss: the newest change Redis saw disconnected the user, so no database query;
        the refusal's reason then, ``blocked`` when ``storage.block`` mirrors a block there (the
        same round trip), else ``not_connected``. ``None``: not gone, or unknown when Redis
        fails (PostgreSQL decides)."""
        try:
            return await gone_reason(self.redis, user_id)
        except REDIS_UNAVAILABLE as exc:
            self._redis_failed(exc)
            return None

    async def authenticate(self, header: str | None, route: str) -> Principal:
        """The token alone (admin routes); a refusal is counted and journaled."""
        try:
            return await self.tokens.validate(header)
        except TokenError as exc:
            self._decisions.inc(route, INVALID_TOKEN, exc.reason)
            self.recorder.record(self.clock(), None, None, INVALID_TOKEN, exc.reason, route)
            raise

    async def authorize_role(self, header: str | None, route: str, role: str) -> Principal:
        """A valid token carrying ``role`` in its ``roles`` claim (admin routes); the caller's
        own session is not checked (service accounts hold such tokens too)."""
        principal = await self.authenticate(header, route)
        if role not in principal.roles:
            raise self.refuse(principal, route, "missing_role")
        self.recorder.record(
            self.clock(), principal.user_id, principal.session_id, GRANTED, None, route
        )
        self._decisions.inc(route, GRANTED, "")
        return principal

    def refuse(self, principal: Principal, route: str, reason: str) -> Denied:
        self._decisions.inc(route, FORBIDDEN, reason)
        self.recorder.record(
            self.clock(), principal.user_id, principal.session_id, FORBIDDEN, reason, route
        )
        return Denied(reason)

    async def authorize(self, header: str | None, route: str) -> Grant:
        """A valid token of a connected, non-idle user and session; else TokenError/Denied."""
        principal = await self.authenticate(header, route)
        user_id = principal.user_id
        usable, raw = await self._cached(user_id)
        if raw is not None:
            self._cache_hits.inc("hit")
            parsed = self._parsed.get(raw)
            if parsed is None:
                parsed = self._parse(raw)
        else:
            gone = await self._gone(user_id) if usable else None
            if gone is not None:
                self._cache_hits.inc("gone")
                raise self.refuse(principal, route, gone)
            self._cache_hits.inc("miss" if usable else "bypass")
            snapshot = await self._load(user_id, refill_cache=usable)
            if snapshot is None:
                raise self.refuse(principal, route, "not_connected")  # unknown user
            parsed = self._parse(snapshot.to_json().encode())
        user, last = parsed
        if user.get("status") != CONNECTED:
            raise self.refuse(
                principal, route, "blocked" if user.get("blocked") else "not_connected"
            )
        # After the status: a disconnected user is 403 not_connected whatever the cache path.
        if predates_fence(principal.claims, user.get(_FENCE), self.tokens.leeway):
            self._decisions.inc(route, INVALID_TOKEN, "revoked")
            self.recorder.record(self.clock(), user_id, principal.session_id, INVALID_TOKEN,
                                 "revoked", route)  # fmt: skip
            raise TokenError("revoked")
        sid = principal.session_id
        if sid is not None and sid not in user.get("sessions", ()):
            raise self.refuse(principal, route, "session_ended")
        now = self.clock()
        if self.session_max_s is not None and self._past_lifetime(user, sid, now):
            raise self.refuse(principal, route, "max_lifetime")
        key = sid if sid is not None else IMPLICIT_SESSION
        seen = user[_SEEN].get(key) if self.per_session else None
        if seen is not None:
            if await self._session_idle(user_id, key, seen, now):
                raise self.refuse(principal, route, "idle_timeout")
        elif last is not None and now - last > self.idle_timeout_s:
            last = max(last, self.recorder.pending(user_id) or 0.0)
            if now - last > self.idle_timeout_s:
                pending = await self._pending_activity(user_id)
                if pending is None or now - pending.timestamp() > self.idle_timeout_s:
                    raise self.refuse(principal, route, "idle_timeout")
        self.recorder.touch(user_id, key, now)
        self.recorder.record(now, user_id, sid, GRANTED, None, route)
        self._decisions.inc(route, GRANTED, "")
        return Grant(principal, user)

    async def _session_idle(self, user_id: str, sid: str, seen: float, now: float) -> bool:
        """The session's newest sign of life is older than the timeout everywhere it can be:
        the cached time, this process's buffer, Redis's, and finally its PostgreSQL row (see the
        module's docstring; a session no longer open there is idle too)."""
        limit = self.idle_timeout_s
        if now - max(seen, self.recorder.pending(user_id, sid) or 0.0) <= limit:
            return False
        pending = await self._pending_activity(user_id, sid)
        if pending is not None and now - pending.timestamp() <= limit:
            return False
        row = await self._load(user_id)
        at = row.session_seen.get(sid) if row is not None else None
        return at is None or now - at.timestamp() > limit

    async def _pending_activity(
        self, user_id: str, session_id: str | None = None
    ) -> datetime | None:
        """Activity still in a Redis hash (the user's, or one session's). Without Redis it is
        unknown: a user that PostgreSQL alone calls idle may have been active a second ago, so
        the answer is 503, not a guess."""
        if self._redis_down:
            raise DependencyUnavailable("redis: pending activity unknown")
        try:
            return await self.activity.pending(user_id, session_id)
        except REDIS_UNAVAILABLE as exc:
            self._redis_failed(exc)
            raise DependencyUnavailable("redis: pending activity unknown") from exc

    def _past_lifetime(self, user: dict[str, Any], sid: str | None, now: float) -> bool:
        """The token's session (without ``sid``: every open session) started longer ago than
        ``SESSIOND_SESSION_MAX_S``. The sweep ends such sessions; this refuses them meanwhile."""
        assert self.session_max_s is not None
        started: dict[str, float] = user.get(_STARTED) or {}
        if sid is not None:
            at = started.get(sid)
            return at is not None and now - at > self.session_max_s
        return bool(started) and all(now - at > self.session_max_s for at in started.values())

    def _parse(self, raw: bytes) -> tuple[dict[str, Any], float | None]:
        """The cached JSON as a dict and its newest sign-of-life time (connect, flushed activity).
        Remembered by content: identical bytes always mean the identical state."""
        user: dict[str, Any] = json.loads(raw)
        times = [t for t in (_epoch(user.get(name)) for name in _TIME_FIELDS) if t is not None]
        started = ((sid, _epoch(at)) for sid, at in (user.get("session_started") or {}).items())
        user[_STARTED] = {sid: t for sid, t in started if t is not None}
        user[_FENCE] = _epoch(user.get("logged_out_at"))
        seen = ((sid, _epoch(at)) for sid, at in (user.get("session_seen") or {}).items())
        user[_SEEN] = {sid: t for sid, t in seen if t is not None}
        parsed = (user, max(times) if times else None)
        if len(self._parsed) >= 10_000:
            self._parsed.clear()
        self._parsed[raw] = parsed
        return parsed

    async def last_activity(self, grant: Grant) -> str | None:
        """Newest known activity before this request: flushed, pending in Redis or here."""
        user_id = grant.principal.user_id
        candidates = [_epoch(grant.user.get("last_activity_at"))]
        pending = None
        if not self._redis_down:
            try:
                pending = await self.activity.pending(user_id)
            except REDIS_UNAVAILABLE as exc:  # informative field: answer with what is known
                self._redis_failed(exc)
        if pending is not None:
            candidates.append(pending.timestamp())
        values = [c for c in candidates if c is not None]
        return iso(max(values)) if values else None
