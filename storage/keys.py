"""Redis key names, and how they are laid out over a Redis Cluster's slots (CONTRACT §2, §10).

A Redis Cluster runs a Lua script or a multi-key command only when all its keys hash to one
slot, and it hashes only the part of a key between the first ``{`` and the next ``}`` when there
is one (else the whole name). The seed's ``user:<id>`` has no braces and keeps its exact name
(other systems read it), so its slot is that of the whole name; the user's companion keys carry
a hash tag that hashes to the same slot: ``uver:{user:<id>}``, ``gone:{user:<id>}``,
``blocked:{user:<id>}``. An id whose ``user:<id>`` contains braces gets a tag of the same slot
taken from ``slot_tags`` instead, followed by ``user:<id>`` (so each name stays unique).

On a single Redis every name stays what it was before clusters were supported (``uver:<id>``,
the one ``activity`` hash, ...): nothing changes for an existing deployment, and no rolling
upgrade ever meets two names for one thing. A cluster is a new Redis: nothing to carry over.

The global buffers are one key each on a single Redis and ``SHARDS`` keys on a cluster, their
tags chosen so that shard ``i`` hashes to slot ``i * 16384 / SHARDS``: spread evenly over the
slot space, hence over the masters (three masters with the usual even split hold five or six
shards each). ``crc32(user_id) % SHARDS`` picks a user's activity shard.
"""

from __future__ import annotations

import binascii
import zlib
from dataclasses import dataclass
from functools import cache
from typing import Final

SLOTS: Final = 16384
SHARDS: Final = 16


def key_slot(key: str | bytes) -> int:
    """The slot Redis Cluster hashes ``key`` to (CRC16/XMODEM of its hash tag, mod 16384)."""
    raw = key.encode() if isinstance(key, str) else key
    return binascii.crc_hqx(_hashed(raw), 0) % SLOTS


def _hashed(raw: bytes) -> bytes:
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            return raw[start + 1 : end]
    return raw


@cache
def slot_tags() -> tuple[str, ...]:
    """One brace-free tag per slot (decimal numbers, the first found for each slot), computed
    once per process (about 0.1 s)."""
    table: dict[int, str] = {}
    n = 0
    while len(table) < SLOTS:
        tag = str(n)
        table.setdefault(binascii.crc_hqx(tag.encode(), 0) % SLOTS, tag)
        n += 1
    return tuple(table[s] for s in range(SLOTS))


@cache
def shard_tags() -> tuple[str, ...]:
    return tuple(slot_tags()[i * SLOTS // SHARDS] for i in range(SHARDS))


def user_key(user_id: str) -> str:
    return f"user:{user_id}"


def _companion(prefix: str, user_id: str) -> str:
    """``<prefix>:{user:<id>}``, in the slot of ``user:<id>`` (see the module docstring)."""
    seed = user_key(user_id)
    hashed = _hashed(seed.encode()).decode()
    if hashed == seed and "}" not in seed:
        return f"{prefix}:{{{seed}}}"
    return f"{prefix}:{{{slot_tags()[key_slot(seed)]}}}{seed}"


def companion_user_id(key: str, prefix: str) -> str | None:
    """The user id of a companion key named by ``_companion`` (``None``: not one)."""
    head = f"{prefix}:{{"
    if not key.startswith(head):
        return None
    rest = key[len(head) :]
    close = rest.find("}")
    if close == len(rest) - 1:
        return rest[len("user:") : close] if rest.startswith("user:") else None
    seed = rest[close + 1 :]
    return seed[len("user:") :] if close > 0 and seed.startswith("user:") else None


@dataclass(frozen=True, slots=True)
class AccessShard:
    """One shard of the access journal's buffers: the list, its byte count, the overflow counts
    and the refused-token counts. The first three share a slot (one script writes them)."""

    entries: str
    nbytes: str
    overflow: str
    refused: str


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """The names for a single Redis (``cluster`` False) or a Redis Cluster."""

    cluster: bool

    def version(self, user_id: str) -> str:
        return _companion("uver", user_id) if self.cluster else f"uver:{user_id}"

    def gone(self, user_id: str) -> str:
        return _companion("gone", user_id) if self.cluster else f"gone:{user_id}"

    def blocked(self, user_id: str) -> str:
        return _companion("blocked", user_id) if self.cluster else f"blocked:{user_id}"

    def gone_user_id(self, key: str) -> str | None:
        if self.cluster:
            return companion_user_id(key, "gone")
        return key.removeprefix("gone:") if key.startswith("gone:") else None

    @property
    def gone_pattern(self) -> str:
        return "gone:{*" if self.cluster else "gone:*"

    @property
    def activity_keys(self) -> tuple[str, ...]:
        """The activity hashes (user id → newest request time), one per shard."""
        if not self.cluster:
            return ("activity",)
        return tuple(f"activity:{{{t}}}" for t in shard_tags())

    def activity_key(self, user_id: str) -> str:
        keys = self.activity_keys
        return keys[0] if len(keys) == 1 else keys[zlib.crc32(user_id.encode()) % len(keys)]

    @property
    def access_shards(self) -> tuple[AccessShard, ...]:
        if not self.cluster:
            return (
                AccessShard("audit:access", "audit:access:bytes", "audit:access:overflow",
                            "audit:refused"),
            )  # fmt: skip
        return tuple(
            AccessShard(f"audit:access:{{{t}}}", f"audit:access:bytes:{{{t}}}",
                        f"audit:access:overflow:{{{t}}}", f"audit:refused:{{{t}}}")
            for t in shard_tags()
        )  # fmt: skip

    @property
    def reconcile_marks(self) -> tuple[str, ...]:
        """The reconciler's mark, once per shard on a cluster: each master holds some, so a
        master failed over to a lagging replica brings its own marks back with its data."""
        if not self.cluster:
            return ("sessiond:reconcile:mark",)
        return tuple(f"sessiond:reconcile:mark:{{{t}}}" for t in shard_tags())


SINGLE: Final = KeyLayout(cluster=False)
CLUSTER: Final = KeyLayout(cluster=True)
