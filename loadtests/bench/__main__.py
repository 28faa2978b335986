"""``python -m loadtests.bench``: runs the stages asked for and prints the table and JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtests import harness
from loadtests.bench import __doc__ as BENCH_DOC
from loadtests.bench import stage_cluster
from loadtests.bench.report import machine, render, table
from loadtests.bench.stage_activity import ActivityWrites
from loadtests.bench.stage_auth import AuthCheck
from loadtests.bench.stage_events import Events
from loadtests.bench.stage_expiry import Expiry
from loadtests.bench.stage_memory import RedisMemory
from loadtests.bench.tools import rss_of, say


class Bench(AuthCheck, Events, ActivityWrites, RedisMemory, Expiry):
    """Every stage on one system under test."""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=BENCH_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--name", default="sessiond_bench5", help="vhost and database")
    p.add_argument("--redis-db", type=int, default=12)
    p.add_argument("--workers", type=int, default=2, help="API workers (and bare Sanic workers)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--duration", type=int, default=10, help="wrk seconds")
    p.add_argument("--rounds", type=int, default=2, help="alternating wrk rounds per server")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--revocations", type=int, default=20)
    p.add_argument("--event-users", type=int, default=1000)
    p.add_argument("--events-per-user", type=int, default=10)
    p.add_argument("--events-timeout", type=float, default=240)
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--request-users", type=int, default=1000)
    p.add_argument("--cache-users", type=int, default=100_000)
    p.add_argument("--expiry-users", type=int, default=1_000_000)
    p.add_argument("--expiry-stale", type=int, default=100_000)
    p.add_argument("--expiry-pending", type=int, default=100_000)
    p.add_argument("--only", default="1,2,3,4,5", help="stages to run (3 needs 2)")
    p.add_argument("--quick", action="store_true", help="small sizes, to check the bench itself")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="events/s and /auth/check req/s, single-node stack vs local cluster",
    )
    p.add_argument("--profile", action="store_true", help="py-spy the API (1) and workers (2)")
    p.add_argument("--profile-s", type=float, default=20)
    p.add_argument("--json-out", type=Path, default=harness.RESULTS / "bench.json")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.revocations, args.rounds = 3, 5, 1
        args.event_users, args.events_per_user = 200, 5
        args.requests, args.request_users, args.cache_users = 10_000, 200, 10_000
        args.expiry_users, args.expiry_stale, args.expiry_pending = 20_000, 2_000, 2_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.cluster:
        return cluster_main(args)
    stages = {s.strip() for s in args.only.split(",") if s.strip()}
    harness.RESULTS.mkdir(exist_ok=True)
    bench = Bench(args)
    out: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average": {"start": harness.load_average()},
        "settings": {k: v for k, v in vars(args).items() if k != "json_out"},
    }
    started = time.monotonic()
    timings: dict[str, float] = {}

    def stage(key: str, fn: Callable[[], dict[str, Any]]) -> None:
        if key not in stages:
            return
        say(f"stage {key} ... (load average {harness.load_average()})")
        t = time.monotonic()
        out[key] = fn()
        timings[key] = round(time.monotonic() - t, 1)
        out["load_average"][f"after_{key}"] = harness.load_average()

    try:
        if stages & {"1", "2", "3", "5"}:
            bench.start()
        stage("1", bench.auth_check)
        stage("2", bench.events)
        stage("3", bench.activity_writes)
        if "5" in stages:
            assert bench.api is not None and bench.worker is not None
            api_rss = out.get("1", {}).get("rss_api_after_load") or rss_of(bench.api)
            worker_rss = out.get("2", {}).get("rss_worker_after_load") or rss_of(bench.worker)
            bench.stop()
            stage("5", lambda: {"redis": bench.redis_memory()})
            out["5"]["rss_api"] = api_rss
            out["5"]["rss_worker"] = worker_rss
            out["5"]["rss_api_worker_mib"] = max(api_rss["children"] or [0])
            out["5"]["rss_worker_process_mib"] = max(worker_rss["children"] or [0])
        bench.stop()
        stage("4", bench.expiry)
    finally:
        bench.stop()
        bench.loop.close()
    out["stage_s"] = timings
    out["total_s"] = round(time.monotonic() - started, 1)
    out["table"] = render(table(out))
    args.json_out.write_text(json.dumps(out, indent=2))
    say("")
    say(out["table"])
    say(f"\ntotal {out['total_s']} s; load average {out['load_average']}")
    print(json.dumps(out))
    return 0


def cluster_main(args: argparse.Namespace) -> int:
    harness.RESULTS.mkdir(exist_ok=True)
    started = time.monotonic()
    res = stage_cluster.compare(args)
    res["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    res["machine"] = machine()
    res["settings"] = {k: v for k, v in vars(args).items() if k != "json_out"}
    res["total_s"] = round(time.monotonic() - started, 1)
    res["table"] = stage_cluster.render(res)
    (harness.RESULTS / "bench_cluster.json").write_text(json.dumps(res, indent=2))
    say("")
    say(res["table"])
    say(f"\ntotal {res['total_s']} s")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
