"""Session state, by its public names: the one import path the actors, the API and the tests use.

The work is split along its seams:
- ``storage.rules``: the session rules as pure code over locked rows (the one state machine),
  with ``storage.forced`` (an administrator's and the clock's decisions) and ``storage.blocking``;
- ``storage.rows``: the rows and outcomes they work on;
- ``storage.unit_of_work``: load and lock the rows, save what the rules changed;
- ``storage.commands``: the changes (events, admin decisions), one transaction each;
- ``storage.queries``: reads outside any unit of work;
- ``storage.expiry``: the sweep, which selects candidates and lets the same rules decide.
"""

from __future__ import annotations

from storage.commands import (
    apply_event,
    apply_events,
    audit,
    force_disconnect,
    publish_snapshot,
    revoke_session,
)
from storage.queries import find_session_owners, load_snapshot
from storage.rows import IMPLICIT, Limits, Outcome, Session, to_snapshot, touched
from storage.rules import State
from storage.unit_of_work import UnitOfWork, unit_of_work

__all__ = [
    "IMPLICIT",
    "Limits",
    "Outcome",
    "Session",
    "State",
    "UnitOfWork",
    "apply_event",
    "apply_events",
    "audit",
    "find_session_owners",
    "force_disconnect",
    "load_snapshot",
    "publish_snapshot",
    "revoke_session",
    "to_snapshot",
    "touched",
    "unit_of_work",
]
