"""Revocations whose users the source does not name (CONTRACT §8), resolved against PostgreSQL.

Keycloak's ``DELETE /admin/realms/<realm>/sessions/<sid>`` reports only the session id, and
``logout-all`` only the realm. Such an event (``Event.lookup``) is expanded here, just before it
is applied, into ordinary per-user ``disconnected`` events that go through the one state machine:
- ``session``: one event per user holding a session ``session_id`` from the same source (ids are
  unique per user only; Keycloak's are UUIDs, so in practice one owner). None: nothing to end;
- ``realm``: one user-wide logout per user with an open session from that source, i.e. every
  connected Keycloak user. sessiond does not record realms, so a ``logout-all`` of one realm logs
  out the Keycloak users of every realm the queue receives: more is refused, never less.

The expanded events keep the original time (ordering fences apply as to any event) and get their
own de-duplication key per user, so a redelivered admin event stays a no-op.

Also here: the single-use ledger of OIDC back-channel logout tokens (``jti``), in Redis.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import replace

from sessiond.events import MAX_EVENT_ID, Event
from storage.db import conn
from storage.models import CONNECTED
from storage.redis_conn import AsyncClient

_OWNERS = """
SELECT DISTINCT user_id FROM sessions WHERE session_id = $1 AND source = $2 ORDER BY user_id
"""
_CONNECTED = """
SELECT DISTINCT user_id FROM sessions WHERE status = $1 AND source = $2 ORDER BY user_id
"""


def _for_user(ev: Event, user_id: str, session_id: str | None) -> Event:
    event_id = None if ev.event_id is None else f"{ev.event_id}:{user_id}"[:MAX_EVENT_ID]
    return replace(ev, user_id=user_id, session_id=session_id, event_id=event_id, lookup=None)


async def expand(events: Sequence[Event]) -> list[Event]:
    """The events with every lookup replaced by its per-user events, in the same order."""
    if all(ev.lookup is None for ev in events):
        return list(events)
    db = conn()
    out: list[Event] = []
    for ev in events:
        if ev.lookup is None:
            out.append(ev)
        elif ev.lookup == "session" and ev.session_id:
            rows = await db.execute_query_dict(_OWNERS, [ev.session_id, ev.source])
            out += [_for_user(ev, str(r["user_id"]), ev.session_id) for r in rows]
        elif ev.lookup == "realm":
            rows = await db.execute_query_dict(_CONNECTED, [CONNECTED, ev.source])
            out += [_for_user(ev, str(r["user_id"]), None) for r in rows]
    return out


def jti_key(issuer: str, jti: str) -> str:
    """Redis key remembering a used logout token (hashed: both parts are caller-chosen text)."""
    digest = hashlib.blake2b(f"{issuer}\x1f{jti}".encode(), digest_size=16).hexdigest()
    return f"bcl:jti:{digest}"


async def claim_jti(client: AsyncClient, issuer: str, jti: str, ttl_s: float) -> bool:
    """True the first time ``jti`` of ``issuer`` is seen (remembered ``ttl_s``, the token's
    remaining lifetime); False for a replay."""
    ttl = max(1, math.ceil(ttl_s))
    return bool(await client.set(jti_key(issuer, jti), "1", nx=True, ex=ttl))


async def release_jti(client: AsyncClient, issuer: str, jti: str) -> None:
    """Forgets a claim whose logout failed, so that the identity provider's retry is accepted."""
    await client.delete(jti_key(issuer, jti))
