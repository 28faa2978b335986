"""``python -m tests.model --minutes N --seed S``: the model checker of the running system.

Needs the local stack of this checkout (``sessiond stack up``, with the worktree's
``SESSIOND_STACK_*`` ports); with ``--cluster``, the local cluster (``sessiond stack up
--cluster``, started when it is not running) and the cluster's faults. Prints histories run,
requests checked, faults injected by kind, and every violation with the operations around it and
the seed that reproduces it; exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections.abc import Sequence

from sessiond.logs import setup_logging
from tests.model.generator import CLUSTER_FAULT_KINDS, FAULT_KINDS
from tests.model.runner import Report, RunConfig, run


def render(report: Report) -> str:
    cfg = report.config
    statuses = ", ".join(
        f"{'no answer' if k is None else k}: {n}"
        for k, n in sorted(report.requests.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
    )
    faults = ", ".join(f"{k}: {n}" for k, n in sorted(report.faults.items())) or "none"
    lines = [
        f"model checker: seed {cfg.seed}, {cfg.minutes:g} min, {report.seconds:.0f} s in all"
        + (" (local cluster)" if cfg.cluster else ""),
        f"histories run: {report.histories}",
        f"requests checked: {sum(report.requests.values())} ({statuses})",
        f"faults injected: {sum(report.faults.values())} ({faults})",
        f"violations: {len(report.violations)}",
    ]
    if report.unchecked:
        lines.append(f"final state not checked (admin disconnect unanswered): {report.unchecked}")
    lines += [f"note: {n}" for n in report.notes]
    by_kind: dict[str, int] = {}
    for v in report.violations:
        by_kind[v.kind] = by_kind.get(v.kind, 0) + 1
    if by_kind:
        lines.append("violations by kind: " + ", ".join(f"{k}: {n}" for k, n in by_kind.items()))
    for i, v in enumerate(report.violations[:20], 1):
        lines.append(f"--- violation {i}: {v.kind} user {v.user} at t={v.at:.3f}: {v.message}")
        lines += [f"    {c}" for c in v.context]
    if len(report.violations) > 20:
        lines.append(f"... and {len(report.violations) - 20} more")
    if report.violations:
        faults_arg = ",".join(cfg.faults) if cfg.faults else "none"
        lines.append(
            f"reproduce: python -m tests.model --minutes {cfg.minutes:g} --seed {cfg.seed}"
            f"{' --cluster' if cfg.cluster else ''} --faults {faults_arg}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.model", description=__doc__)
    p.add_argument("--minutes", type=float, default=1.0, help="how long new histories start")
    p.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    p.add_argument("--concurrency", type=int, default=8, help="histories stepping at once")
    p.add_argument("--api-workers", type=int, default=2)
    p.add_argument(
        "--cluster",
        action="store_true",
        help="run on the local cluster (sessiond stack up --cluster) with its own faults",
    )
    p.add_argument(
        "--faults",
        default=None,
        help=f"comma-separated nemesis actions, or 'none' (default: {','.join(FAULT_KINDS)};"
        f" with --cluster: {','.join(CLUSTER_FAULT_KINDS)})",
    )
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    known = CLUSTER_FAULT_KINDS if args.cluster else FAULT_KINDS
    chosen = ",".join(known) if args.faults is None else args.faults
    faults = () if chosen == "none" else tuple(f for f in chosen.split(",") if f)
    unknown = set(faults) - set(known)
    if unknown:
        p.error(f"unknown faults {sorted(unknown)}; known: {', '.join(known)}")
    setup_logging("WARNING")
    # The publisher's reconnects while the nemesis restarts RabbitMQ are expected, not news.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    print(f"model checker: seed {seed}", flush=True)
    report = run(
        RunConfig(
            minutes=args.minutes,
            seed=seed,
            concurrency=args.concurrency,
            api_workers=args.api_workers,
            faults=faults,
            cluster=args.cluster,
        )
    )
    print(render(report), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
