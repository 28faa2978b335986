"""The event contract (CONTRACT §1) as pure code: decoding, validation and partitioning.

Kept free of I/O so the rules that decide what is a valid event can be unit-tested and fuzzed.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sessiond.errors import InvalidEvent

EventKind = Literal["connected", "disconnected", "activity", "blocked", "unblocked"]
# What the auth service may publish (CONTRACT §1); the others come from Keycloak only
# (``activity``: a token refresh; ``blocked``/``unblocked``: a user deleted, disabled, enabled).
KINDS: tuple[EventKind, ...] = ("connected", "disconnected")
Lookup = Literal["session", "realm"]
"""How a revocation names its target when the source does not know the user: ``session`` (the
owners of ``session_id``), ``realm`` (every user with an open session of that source). Such an
event's ``user_id`` only routes it; ``storage.revocation.expand`` turns it into per-user ones."""
MAX_USER_ID = 128
MAX_SESSION_ID = 128
MAX_EVENT_ID = 200
MAX_NAME = 256
MAX_EMAIL = 320
MAX_DEDUP_KEY = 300  # processed_events.key
# Events stamped in the future (publisher clock ahead) are clamped to the receive time, so that a
# skewed clock can never fence off every later event of a session.
FUTURE_SKEW = timedelta(seconds=0)


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event; ``session_id`` is ``None`` for the user's implicit session."""

    kind: EventKind
    user_id: str
    occurred_at: datetime
    session_id: str | None = None
    event_id: str | None = None
    name: str | None = None
    email: str | None = None
    source: str = "auth"
    ip_address: str | None = None
    # Why a ``disconnected`` ends its sessions (``logout`` when absent): ``idp_admin``...
    reason: str | None = None
    lookup: Lookup | None = None

    def dedup_key(self) -> str:
        """Scoped to the source and the user: publisher ids are unique per user at most (user B's
        ``event_id`` 7 is not user A's); without one, identical content is a duplicate."""
        if self.event_id is not None:
            return dedup_key_for(self.source, self.user_id, self.event_id)
        parts = [self.kind, self.user_id, self.session_id or "", self.occurred_at.isoformat()]
        if self.reason is not None:  # only then: the keys of plain events stay what they were
            parts.append(self.reason)
        digest = hashlib.blake2b(
            "\x1f".join(parts).encode(),
            digest_size=16,
        ).hexdigest()
        return f"{self.source}:h:{digest}"

    def to_wire(self) -> dict[str, Any]:
        data = {f: getattr(self, f) for f in self.__slots__}
        data["occurred_at"] = self.occurred_at.isoformat()
        for optional in ("reason", "lookup"):  # absent unless set: older workers still read it
            if data[optional] is None:
                del data[optional]
        return data

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Event:
        fields = dict(data)
        fields["occurred_at"] = datetime.fromisoformat(fields["occurred_at"])
        return cls(**fields)


def dedup_key_for(source: str, user_id: str, event_id: str) -> str:
    """The de-duplication key of a publisher's ``event_id``: readable while it fits the ledger's
    300 characters (the user id's length first, so ``a:b``+``c`` and ``a``+``b:c`` differ),
    else a hash in a namespace of its own."""
    key = f"{source}:id:{len(user_id)}:{user_id}:{event_id}"
    if len(key) <= MAX_DEDUP_KEY:
        return key
    digest = hashlib.blake2b(f"{user_id}\x1f{event_id}".encode(), digest_size=16).hexdigest()
    return f"{source}:idh:{digest}"


def text_field(
    obj: dict[str, Any], key: str, limit: int, *, reason: str | None = None, required: bool = False
) -> str | None:
    """A string (or integer) field, checked so that everything downstream can store and hash it:
    absent or empty is ``None`` (or ``missing_<reason>`` when required); too long, NUL or not
    encodable as UTF-8 (a lone surrogate, which JSON allows) is ``invalid_<reason>``."""
    reason = reason or key
    value = obj.get(key)
    if value is None or value == "":
        if required:
            raise InvalidEvent(f"missing_{reason}", f"{key} is absent or empty")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidEvent(f"invalid_{reason}", f"{key} must be a string")
    text = str(value)
    if required and not text.strip():
        raise InvalidEvent(f"missing_{reason}", f"{key} is blank")
    if len(text) > limit:
        raise InvalidEvent(f"invalid_{reason}", f"{key} longer than {limit} characters")
    if "\x00" in text:
        raise InvalidEvent(f"invalid_{reason}", f"{key} contains NUL")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEvent(f"invalid_{reason}", f"{key} is not valid Unicode") from None
    return text


def load_object(body: bytes, max_bytes: int) -> dict[str, Any]:
    """The size check, then a JSON object, or ``InvalidEvent`` (``too_large``, ``not_json``,
    ``not_object``): the first steps of every decoder."""
    if len(body) > max_bytes:
        raise InvalidEvent("too_large", f"{len(body)} bytes > {max_bytes}")
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidEvent("not_json", str(exc)[:200]) from None
    if not isinstance(obj, dict):
        raise InvalidEvent("not_object", type(obj).__name__)
    return obj


def parse_time(value: Any, *, received_at: datetime) -> datetime:
    """RFC 3339 text or epoch seconds; absent means "when it reached us" (CONTRACT §1)."""
    if value is None:
        return received_at
    if isinstance(value, bool):
        raise InvalidEvent("invalid_occurred_at", "boolean")
    try:
        if isinstance(value, int | float):
            if not math.isfinite(value):
                raise ValueError("not finite")
            when = datetime.fromtimestamp(value, tz=UTC)
        elif isinstance(value, str):
            when = datetime.fromisoformat(value.strip())
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            when = when.astimezone(UTC)
        else:
            raise InvalidEvent("invalid_occurred_at", "must be RFC 3339 text or epoch seconds")
    except (ValueError, OverflowError, OSError) as exc:
        raise InvalidEvent("invalid_occurred_at", str(exc)[:200]) from None
    return min(when, received_at + FUTURE_SKEW)


def decode_event(body: bytes, *, received_at: datetime, max_bytes: int = 64 * 1024) -> Event:
    """A raw message body as an ``Event``, or ``InvalidEvent`` with a stable reason."""
    obj = load_object(body, max_bytes)
    kind = obj.get("event")
    if kind not in KINDS:
        raise InvalidEvent("unknown_event", repr(kind)[:100])
    user_id = text_field(obj, "user_id", MAX_USER_ID, required=True)
    assert user_id is not None
    session_id = text_field(obj, "session_id", MAX_SESSION_ID)
    if session_id == "":
        session_id = None
    return Event(
        kind=kind,
        user_id=user_id,
        occurred_at=parse_time(obj.get("occurred_at"), received_at=received_at),
        session_id=session_id,
        event_id=text_field(obj, "event_id", MAX_EVENT_ID) or None,
        name=text_field(obj, "name", MAX_NAME) if kind == "connected" else None,
        email=text_field(obj, "email", MAX_EMAIL) if kind == "connected" else None,
    )


def partition_of(user_id: str, partitions: int) -> int:
    """Stable across processes and releases (unlike ``hash()``): a user's events stay together."""
    return zlib.crc32(user_id.encode("utf-8")) % partitions


def partition_queue(index: int) -> str:
    return f"sessiond.events.p{index}"
