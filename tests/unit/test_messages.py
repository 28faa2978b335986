"""The wire form of every message sessiond builds itself (``actors.messages``).

Workers of the previous release keep running during a rolling deploy and decode what the new one
enqueues (and the reverse): queue, actor name, argument order and options must stay as they are.
"""

from __future__ import annotations

import json
from typing import Any

import dramatiq

from actors import messages
from actors.forwarding import partition_messages
from actors.scheduler import Job, job_message


def wire(message: dramatiq.Message[Any]) -> dict[str, Any]:
    """The encoded body, without the two fields that differ per message."""
    body = json.loads(message.encode())
    assert isinstance(body.pop("message_id"), str)
    assert isinstance(body.pop("message_timestamp"), int)
    return dict(body)


def test_a_partition_batch_is_one_argument_the_list_of_items() -> None:
    items = [{"event": {"event": "connected", "user_id": "u1"}, "raw": "{}"}]
    assert wire(messages.partition_batch(3, items)) == {
        "queue_name": "sessiond.events.p3",
        "actor_name": "apply_events_p3",
        "args": [items],
        "kwargs": {},
        "options": {},
    }


def test_partition_messages_group_a_batch_by_partition_in_partition_order() -> None:
    items = [(f"user-{i}", {"n": i}) for i in range(20)]
    built = partition_messages(items, 4)
    assert [m.queue_name for m in built] == sorted({m.queue_name for m in built})
    assert sorted(n["n"] for m in built for n in m.args[0]) == list(range(20))
    assert all(m.actor_name == m.queue_name.replace("sessiond.events.p", "apply_events_p")
               for m in built)  # fmt: skip


def test_a_dead_letter_journal_carries_four_positional_arguments() -> None:
    assert wire(messages.dead_letter_journal("undecodable", "x" * 1500, "q", None)) == {
        "queue_name": "sessiond.jobs",
        "actor_name": "record_dead_letter",
        "args": ["undecodable", "x" * 1000, "q", None],
        "kwargs": {},
        "options": {},
    }
    assert wire(messages.dead_letter_journal("too_old", "d", "sessiond.events.p0", "u1"))[
        "args"
    ] == ["too_old", "d", "sessiond.events.p0", "u1"]


def test_a_job_tick_names_its_time_as_a_keyword() -> None:
    assert wire(job_message(Job("flush_activity", 5.0), 360_000_000)) == {
        "queue_name": "sessiond.jobs",
        "actor_name": "flush_activity",
        "args": [],
        "kwargs": {"scheduled_at": 1_800_000_000.0},
        "options": {},
    }
