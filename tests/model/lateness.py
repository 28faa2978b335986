"""How late each event of a model run was: from its publisher confirm (``Op.completed`` in the
run's ``history.jsonl``, monotonic) to its commit (``processed_events.processed_at`` in the run's
database). The monotonic clock is placed on the wall clock by the first ``nemesis`` line of the
run's output, logged the instant the first fault's start was recorded.

    python -m tests.model ... --faults restart_rabbitmq | tee run.out
    python -m tests.model.lateness results/model/s<seed>/history.jsonl run.out

Prints the faults, the latest events and how many were later than 5 and 10 s (a measurement,
not a check; docs/reliability.md, "late, not lost")."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from sessiond import stack
from sessiond.events import dedup_key_for
from tests.model.system import NAMESPACE


def _clock_offset(faults: list[dict[str, Any]], output: Path) -> float:
    for line in output.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"nemesis"' in line:
            wall = datetime.fromisoformat(json.loads(line)["ts"].replace("Z", "+00:00"))
            return wall.timestamp() - float(faults[0]["start"])
    raise SystemExit(f"{output}: no nemesis line (a run without faults cannot be placed)")


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S.%f")[:-3]


async def report(history: Path, output: Path, database_url: str, top: int) -> None:
    faults: list[dict[str, Any]] = []
    ops: list[dict[str, Any]] = []
    for line in history.read_text().splitlines():
        record = json.loads(line)
        if record["type"] == "Fault":
            faults.append(record)
        elif record["type"] == "Op" and record.get("event_id") and record.get("completed"):
            ops.append(record)
    offset = _clock_offset(faults, output)
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        rows = await conn.fetch("SELECT key, processed_at FROM processed_events")
    finally:
        await conn.close()
    committed = {r["key"]: r["processed_at"].timestamp() for r in rows}
    late: list[tuple[float, str, float]] = []
    for op in ops:
        key = dedup_key_for("auth", str(op["user"]), str(op["event_id"]))
        if key in committed:
            confirm = float(op["completed"]) + offset
            late.append((committed[key] - confirm, str(op["event_id"]), confirm))
    late.sort(reverse=True)
    for f in faults:
        sys.stdout.write(
            f"fault {f['kind']} {_clock(f['start'] + offset)} .. {_clock(f['end'] + offset)}\n"
        )
    for seconds, event_id, confirm in late[:top]:
        sys.stdout.write(f"{seconds:6.2f} s  {event_id}  confirmed {_clock(confirm)}\n")
    over5 = sum(1 for x in late if x[0] > 5)
    over10 = sum(1 for x in late if x[0] > 10)
    sys.stdout.write(f"events {len(late)}, later than 5 s: {over5}, later than 10 s: {over10}\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.model.lateness", description=__doc__)
    p.add_argument("history", type=Path, help="the run's history.jsonl")
    p.add_argument("output", type=Path, help="the run's standard output (its nemesis lines)")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
    base = stack.StackConfig.from_env().env_dict()["SESSIOND_DATABASE_URL"]
    database_url = base.rsplit("/", 1)[0] + f"/{NAMESPACE}"  # as tests.model.system names it
    asyncio.run(report(args.history, args.output, database_url, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
