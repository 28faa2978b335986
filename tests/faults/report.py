"""The fault figures: runs the fault suite, prints its table, then measures whether a client
flooding the API with bad tokens slows the others down.

    scripts/faults                 # everything (about 3 minutes)
    scripts/faults --no-abuse      # the fault table only
    scripts/faults -k postgres     # extra arguments go to pytest

Environment: the stack's (``SESSIOND_STACK_*``), ``SESSIOND_TEST_ISOLATION`` as for the tests, and
``SESSIOND_FAULT_PG_DOWN_S`` (default 30) for how long PostgreSQL is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import os
import secrets
import statistics
import subprocess
import sys
import time
from typing import Any

import jwt

from tests.faults._support import RESULTS, ROOT

SECRET = "test-secret-that-is-long-enough-for-hs256"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| fault | events sent | events applied | lost | duplicated in effect | recovery s | note |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        sent = "n/a" if r["sent"] is None else str(r["sent"])
        applied = "n/a" if r["applied"] is None else str(r["applied"])
        lines.append(
            f"| {r['fault']} | {sent} | {applied} | {r['lost']} | {r['duplicated']}"
            f" | {r['recovery_s']} | {r['note']} |"
        )
    return "\n".join(lines)


def run_faults(pytest_args: list[str]) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for old in RESULTS.glob("*.json"):
        old.unlink()
    cmd = [sys.executable, "-m", "pytest", "tests/faults", "-p", "no:cacheprovider", "-q"]
    return subprocess.call([*cmd, *pytest_args], cwd=ROOT)


# --------------------------------------------------------------------------- abuse


def _get(conn: http.client.HTTPConnection, token: str) -> tuple[int, float]:
    started = time.perf_counter()
    conn.request("GET", "/auth/check", headers={"Authorization": f"Bearer {token}"})
    reply = conn.getresponse()
    reply.read()
    return reply.status, time.perf_counter() - started


def _latencies(port: int, token: str, n: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    for _ in range(n):
        status, seconds = _get(conn, token)
        assert status == 200, status
        out.append(seconds)
    conn.close()
    return out


def _flood(port: int, tokens: list[str], expect: int, stop: Any, counter: Any) -> None:
    """One client process cycling through prepared tokens as fast as the server answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    i = 0
    while not stop.is_set():
        status, _ = _get(conn, tokens[i % len(tokens)])
        assert status == expect, status
        i += 1
    with counter.get_lock():
        counter.value += i
    conn.close()


def _beside(port: int, good: str, n: int, tokens: list[str], expect: int, flooders: int) -> Any:
    """The good client's latencies while ``flooders`` processes send ``tokens``; and their rate."""
    ctx = multiprocessing.get_context("spawn")
    stop, counter = ctx.Event(), ctx.Value("q", 0)
    procs = [
        ctx.Process(target=_flood, args=(port, tokens, expect, stop, counter), daemon=True)
        for _ in range(flooders)
    ]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let them ramp up
    started = time.monotonic()
    latencies = _latencies(port, good, n)
    elapsed = time.monotonic() - started
    stop.set()
    for p in procs:
        p.join(10)
    return latencies, counter.value / (elapsed + 1.0)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def measure_abuse(flooders: int = 4, n: int = 2000) -> dict[str, Any]:
    """One ``sessiond api`` worker; a good client's latency alone, beside ``flooders`` client
    processes sending nothing but forged tokens, and beside the same load of valid tokens."""
    from loadtests.harness import free_port
    from sessiond import stack
    from sessiond.config import Settings
    from sessiond.events import Event
    from storage import cache as cache_mod
    from storage import db as db_mod
    from storage import redis_conn
    from storage.state import apply_event, publish_snapshot
    from tests.conftest import isolated

    cfg = stack.StackConfig.from_env()
    env = {**os.environ, **isolated(cfg), "SESSIOND_JWT_SECRET": SECRET, "SESSIOND_ENV": "test",
           "SESSIOND_LOG_LEVEL": "WARNING"}  # fmt: skip
    settings = Settings(
        database_url=env["SESSIOND_DATABASE_URL"], redis_url=env["SESSIOND_REDIS_URL"]
    )

    async def seed() -> None:
        await db_mod.open_db(settings)
        cache = cache_mod.Cache(redis_conn.connect(settings), ttl_s=3600)
        try:
            outcome = await apply_event(
                Event(kind="connected", user_id="abuse-good", occurred_at=_now())
            )
            await publish_snapshot(cache, outcome)
        finally:
            await cache.close()
            await db_mod.close_db()

    asyncio.run(seed())
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sessiond.cli", "api", "--workers", "1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not stack._port_open(port):
            if time.monotonic() > deadline:
                raise RuntimeError("sessiond api did not start")
            time.sleep(0.2)
        good = jwt.encode({"sub": "abuse-good", "exp": int(time.time()) + 600}, SECRET)
        claims = {"sub": "abuse-good", "exp": int(time.time()) + 600}
        # Distinct forged tokens (a refused token is never cached: each costs a signature check)
        forged = [
            jwt.encode({**claims, "n": secrets.token_hex(4)}, secrets.token_bytes(32))
            for _ in range(5000)
        ]
        _latencies(port, good, 200)  # warm up
        alone = _latencies(port, good, n)
        flooded, bad_rate = _beside(port, good, n, forged, 401, flooders)
        # The same load of valid tokens, for comparison: is a bad token dearer than a good one?
        loaded, good_rate = _beside(port, good, n, [good], 200, flooders)
    finally:
        proc.terminate()
        proc.wait(20)
    return {
        "good_alone_p50_ms": round(_pct(alone, 0.5), 2),
        "good_alone_p99_ms": round(_pct(alone, 0.99), 2),
        "good_flooded_p50_ms": round(_pct(flooded, 0.5), 2),
        "good_flooded_p99_ms": round(_pct(flooded, 0.99), 2),
        "bad_tokens_per_s": round(bad_rate),
        "good_loaded_p50_ms": round(_pct(loaded, 0.5), 2),
        "good_loaded_p99_ms": round(_pct(loaded, 0.99), 2),
        "valid_tokens_per_s": round(good_rate),
        "flooders": flooders,
        "flooded_vs_loaded_mean": round(statistics.mean(flooded) / statistics.mean(loaded), 2),
    }


def abuse_table(a: dict[str, Any]) -> str:
    return "\n".join(
        [
            "| a good client's /auth/check | p50 ms | p99 ms | other clients' requests/s |",
            "|---|---:|---:|---:|",
            f"| alone | {a['good_alone_p50_ms']} | {a['good_alone_p99_ms']} | 0 |",
            f"| beside {a['flooders']} processes sending forged tokens (401) |"
            f" {a['good_flooded_p50_ms']} | {a['good_flooded_p99_ms']} | {a['bad_tokens_per_s']} |",
            f"| beside {a['flooders']} processes sending valid tokens (200) |"
            f" {a['good_loaded_p50_ms']} | {a['good_loaded_p99_ms']} | {a['valid_tokens_per_s']} |",
        ]
    )


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/faults", description=__doc__.splitlines()[0])
    parser.add_argument("--no-abuse", action="store_true", help="skip the bad-token measurement")
    parser.add_argument("--no-faults", action="store_true", help="only the bad-token measurement")
    args, pytest_args = parser.parse_known_args(argv)
    code = 0
    if not args.no_faults:
        code = run_faults(pytest_args)
        rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
        print("\n" + table(rows))
        (RESULTS.parent / "faults.md").write_text(table(rows) + "\n")
    if not args.no_abuse:
        abuse = measure_abuse()
        (RESULTS.parent / "abuse.json").write_text(json.dumps(abuse) + "\n")
        (RESULTS.parent / "abuse.md").write_text(abuse_table(abuse) + "\n")
        print("\n" + abuse_table(abuse))
    return code


if __name__ == "__main__":
    sys.exit(main())
