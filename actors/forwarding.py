"""What the ingress publishes: events grouped into partition batches, built in pure code."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import dramatiq

from actors import messages
from sessiond.events import Event, partition_of


@dataclass(frozen=True, slots=True)
class Stamps:
    """The times the ingress gave one message."""

    received_at: datetime  # the receipt (or the first receipt, for a replay): bounds any time
    stamped_at: datetime  # the time of an event that carries none


def event_item(
    event: Event, raw: bytes, exchange: str, routing_key: str, stamps: Stamps | None = None
) -> dict[str, Any]:
    """One event as it travels to its partition: validated, plus the original body, where it
    came from and the stamps it was given, so that a dead letter can be replayed exactly as it
    was published and first received."""
    item: dict[str, Any] = {
        "event": event.to_wire(),
        "raw": raw.decode("utf-8"),
        "exchange": exchange,
        "routing_key": routing_key,
    }
    if stamps is not None:
        item["received_at"] = stamps.received_at.isoformat()
        item["stamped_at"] = stamps.stamped_at.isoformat()
    return item


def partition_messages(
    items: list[tuple[str, dict[str, Any]]], partitions: int
) -> list[dramatiq.Message[Any]]:
    """One Dramatiq message per partition for a batch of ``(user_id, item)``, in arrival order:
    the partition's actor applies them in one transaction."""
    grouped: dict[int, list[dict[str, Any]]] = {}
    for user_id, item in items:
        grouped.setdefault(partition_of(user_id, partitions), []).append(item)
    return [messages.partition_batch(index, batch) for index, batch in sorted(grouped.items())]


def with_stamp(event: Event, stamps: Stamps) -> Event:
    """An event whose time is the receipt (it carried none, or a future one that was clamped)
    takes the stamp instead, which is the receipt unless the publisher's ``timestamp`` or a
    replay says otherwise."""
    if stamps.stamped_at != stamps.received_at and event.occurred_at == stamps.received_at:
        return dataclasses.replace(event, occurred_at=stamps.stamped_at)
    return event
