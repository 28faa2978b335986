"""One command for the Locust scenarios against the local stack, headless and bounded.

    .venv/bin/python -m loadtests.run [-u 20] [-r 10] [-t 60s] [--locust-workers N]

1. takes a namespace of its own on the local stack (vhost and database ``--name``, Redis db
   ``--redis-db``; or, with ``--use-env``, the ``SESSIOND_*`` variables already set, which it
   then owns) and empties it;
2. starts ``sessiond api``, ``sessiond worker`` and ``sessiond scheduler`` on 127.0.0.1 (or, with
   ``--external URL``, uses an already running ``sessiond run`` and touches only the run's users);
3. runs ``locust -f loadtests/locustfiles --headless -u -r -t`` (with ``--locust-workers N``:
   one master and N local worker processes), CSV and HTML reports in ``results/<prefix>*``;
4. stops the API gracefully (its buffered decisions reach Redis), runs one activity flush, then
   checks the final PostgreSQL/Redis state against the publishers' ledger (``loadtests/check.py``).

Exit code: 0 when the gates (failure ratio, p95) hold and the state matches; 1 otherwise.
``results/<prefix>_summary.json`` holds the verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from loadtests import check, harness

LOCUSTFILES = harness.ROOT / "loadtests" / "locustfiles"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("-u", "--users", type=int, default=20)
    p.add_argument("-r", "--spawn-rate", type=float, default=10.0)
    p.add_argument("-t", "--run-time", default="60s")
    p.add_argument("--name", default="sessiond_load5", help="vhost and database of the run")
    p.add_argument("--redis-db", type=int, default=12)
    p.add_argument("--use-env", action="store_true", help="own the SESSIOND_* env's namespace")
    p.add_argument("--external", metavar="URL", help="API of a running `sessiond run`")
    p.add_argument("--api-workers", type=int, default=2)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--locust-workers", type=int, default=0, help="local Locust worker processes")
    p.add_argument("--expect-workers", type=int, default=0, help="remote Locust workers to await")
    p.add_argument("--master-bind-host", default="127.0.0.1", help="0.0.0.0 for remote workers")
    p.add_argument("--run-id", help="user id prefix lt-<run id>- (remote workers need the same)")
    p.add_argument("--results", type=Path, default=harness.RESULTS)
    p.add_argument("--prefix", default="locust", help="report file names in --results")
    p.add_argument("--max-fail-ratio", type=float, default=0.01)
    p.add_argument("--max-p95-ms", type=float, default=1000.0)
    p.add_argument("--revocation-bound-ms", type=float, default=2000.0)
    p.add_argument("--grant-bound-ms", type=float, default=15000.0)
    p.add_argument("--drain-timeout", type=float, default=120.0)
    return p.parse_args(argv)


def locust_argv(args: argparse.Namespace, host: str, ledger: Path) -> list[str]:
    out = args.results / args.prefix
    argv = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILES), "--headless",
        "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time,
        "--host", host, "--stop-timeout", "5",
        "--csv", str(out), "--html", f"{out}.html", "--only-summary",
        "--ledger-file", str(ledger),
        "--max-fail-ratio", str(args.max_fail_ratio), "--max-p95-ms", str(args.max_p95_ms),
        "--revocation-bound-ms", str(args.revocation_bound_ms),
        "--grant-bound-ms", str(args.grant_bound_ms),
    ]  # fmt: skip
    workers = args.locust_workers + args.expect_workers
    if workers:
        argv += ["--master", "--expect-workers", str(workers)]
        argv += ["--master-bind-host", args.master_bind_host]
    return argv


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.external or args.use_env:
        env = harness.env_from_environment()
    else:
        env = harness.private_env(args.name, args.redis_db)
    settings = harness.settings_from(env)
    run_id = args.run_id or uuid.uuid4().hex[:8]
    print(f"run id {run_id} (remote workers: SESSIOND_LOAD_RUN_ID={run_id})", file=sys.stderr)
    env = {**env, "SESSIOND_LOAD_RUN_ID": run_id}
    args.results.mkdir(parents=True, exist_ok=True)
    logs = args.results / f"{args.prefix}_logs"
    ledger_path = args.results / f"{args.prefix}_ledger.json"
    ledger_path.unlink(missing_ok=True)
    procs: list[harness.Proc] = []
    summary: dict[str, Any] = {"run_id": run_id, "load_average_before": harness.load_average()}
    try:
        if args.external:
            host = args.external.rstrip("/")
        else:
            asyncio.run(harness.reset(settings))
            port = harness.free_port()
            host = f"http://127.0.0.1:{port}"
            api = harness.sessiond(
                "api", ["api", "--workers", str(args.api_workers), "--port", str(port)], env, logs
            ).start()
            procs.append(api)
            procs.append(
                harness.sessiond(
                    "worker",
                    ["worker", "--processes", str(args.processes), "--threads", str(args.threads)],
                    env,
                    logs,
                ).start()
            )
            procs.append(harness.sessiond("scheduler", ["scheduler"], env, logs).start())
            harness.wait_http(f"{host}/health/ready", api, timeout=60)

        locust = harness.Proc("locust", locust_argv(args, host, ledger_path), env,
                              logs / "locust.log").start()  # fmt: skip
        workers = [
            harness.Proc(
                f"locust-worker-{i}",
                [sys.executable, "-m", "locust", "-f", str(LOCUSTFILES), "--worker",
                 "--master-host", "127.0.0.1"],
                env,
                logs / f"locust-worker-{i}.log",
            ).start()
            for i in range(args.locust_workers)
        ]  # fmt: skip
        assert locust.popen is not None
        started = time.monotonic()
        code = locust.popen.wait()
        summary["locust_s"] = round(time.monotonic() - started, 1)
        summary["locust_exit_code"] = code
        for w in workers:
            w.stop(timeout=15)
        if not ledger_path.exists():
            summary["error"] = f"no ledger written; locust log:\n{locust.tail()}"
            return summary
        ledger = json.loads(ledger_path.read_text())
        summary["gates"] = ledger["gates"]
        summary["published"] = {k: ledger[k] for k in ("confirmed", "duplicates", "failed")}
        summary["http_answers"] = ledger["http_answers"]
        if workers and ledger["workers_reported"] != len(workers):
            summary["error"] = (
                f"{ledger['workers_reported']} of {len(workers)} Locust workers sent a ledger"
            )

        if procs:
            procs[0].stop()  # the API: a graceful stop pushes its buffered decisions to Redis
        flushed = subprocess.run(
            [sys.executable, "-m", "sessiond.cli", "flush"],
            env={**os.environ, **env}, cwd=harness.ROOT, capture_output=True, text=True,
            timeout=120, check=False,
        )  # fmt: skip
        summary["flush"] = flushed.stdout.strip()[-500:]
        report = asyncio.run(
            check.check(
                settings,
                ledger,
                drain_timeout=args.drain_timeout,
                journal=not args.external,
                in_flight=args.users,
            )
        )
        summary["check"] = report.to_json()
        summary["load_average_after"] = harness.load_average()
        return summary
    finally:
        for proc in reversed(procs):
            exit_code = proc.stop()
            if exit_code not in (0, None, -15):
                summary.setdefault("process_exits", {})[proc.name] = exit_code


def verdict(summary: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    if "error" in summary:
        problems.append(str(summary["error"]))
    gates = summary.get("gates", {})
    problems += [f"gate: {b}" for b in gates.get("breaches", [])]
    if summary.get("locust_exit_code") not in (0, None):
        problems.append(f"locust exited with {summary['locust_exit_code']}")
    chk = summary.get("check")
    if chk is not None and not chk["ok"]:
        problems += [f"state: {k} x{n}" for k, n in chk["mismatch_counts"].items()]
    if "process_exits" in summary:
        problems.append(f"processes exited badly: {summary['process_exits']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    summary = run(args)
    problems = verdict(summary)
    summary["problems"] = problems
    out = args.results / f"{args.prefix}_summary.json"
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(("FAILED:\n  " + "\n  ".join(problems)) if problems else "OK", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
