"""Issue 14's benchmark: the other protocols of the decision on a cache hit, next to
``/auth/check`` on the same API workers, in the same run.

    .venv/bin/python -m loadtests.bench_protocols [--duration 8] [--rounds 2] [--workers 2]

- ``GET /auth/check`` (HTTP/1.1): ``wrk -t1 -c64``, as ``loadtests.bench`` stage 1;
- ``POST /oauth2/introspect`` (HTTP/1.1, Basic caller, form body): ``wrk -t1 -c64`` with a Lua
  script setting the method, body and headers;
- Envoy's ``Authorization/Check`` (gRPC over cleartext HTTP/2): ``h2load`` (Debian
  ``nghttp2-client``), 16 connections x 4 streams = 64 calls in flight, posting one framed
  ``CheckRequest`` built from ``xds-protos``. ``h2load --h1`` also runs ``/auth/check`` so that
  the gRPC figure has a same-tool baseline.

wrk and h2load are C and use a fraction of a core here; a Python gRPC client would be the
bottleneck, not the server. Rounds alternate between the protocols and the best round of each
counts (a burst of load from elsewhere on a shared machine does not decide a ratio alone). Each
run is checked against the API's own metrics: the granted decisions of its route grew by at least
the number of answers the tool counted, so a fast stream of errors cannot pass for throughput.

Target (issue 14): gRPC Check and introspection each >= 0.7 x ``/auth/check`` requests/s.
Prints a table on stderr and JSON on stdout (also ``results/bench_protocols.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtests import harness
from loadtests.bench.tools import say, token, wrk

TARGET_RATIO = 0.7
GRPC_PATH = "/envoy.service.auth.v3.Authorization/Check"
CLIENT = ("bench", "bench-secret")
USER = "bench-proto"

INTROSPECT_LUA = """
wrk.method = "POST"
wrk.body = "token=" .. os.getenv("BENCH_TOKEN")
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = os.getenv("BENCH_BASIC")
"""


def check_request_frame(bearer: str) -> bytes:
    """One gRPC message (RFC: 1-byte flag, 4-byte length, protobuf) of a ``CheckRequest``."""
    from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

    http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path="/orders/7")
    http.headers.update({"authorization": f"Bearer {bearer}", ":path": "/orders/7"})
    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    body: bytes = request.SerializeToString()
    return struct.pack(">BI", 0, len(body)) + body


def h2load(url: str, *, seconds: int, argv: list[str]) -> dict[str, Any]:
    """Runs h2load for ``seconds``; requests/s, mean latency (ms), 2xx and failed counts."""
    cmd = ["h2load", "-D", str(seconds), "--warm-up-time=1", *argv, url]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    text = done.stdout + done.stderr
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    if done.returncode != 0 or m is None:
        raise RuntimeError(f"h2load failed ({done.returncode}):\n{text}")
    out: dict[str, Any] = {
        "rps": round(float(m.group(1))),
        "wall_s": round(time.monotonic() - started, 2),
    }
    m = re.search(
        r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", text
    )
    if m:
        out.update(requests=int(m.group(2)), succeeded=int(m.group(3)), failed=int(m.group(4)))
    m = re.search(r"status codes: (\d+) 2xx", text)
    out["status_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", text)
    if m:
        out["mean_ms"] = round(
            float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)], 2
        )
    return out


def granted(api_url: str, route: str) -> int:
    """Granted decisions of ``route`` so far, all workers summed (``/metrics``)."""
    with urllib.request.urlopen(api_url + "/metrics", timeout=10) as resp:  # noqa: S310
        text = resp.read().decode()
    labels = f'route="{route}",decision="granted",reason=""'
    pattern = rf"sessiond_access_decisions_total\{{{re.escape(labels)}\}} (\d+)"
    m = re.search(pattern, text)
    return int(m.group(1)) if m else 0


async def seed(settings: Any) -> None:
    """A connected user with a session, in PostgreSQL and in the cache, as a worker leaves it."""
    from sessiond.events import Event
    from storage import cache as cache_mod
    from storage import db as db_mod
    from storage import redis_conn
    from storage.state import apply_event, publish_snapshot

    await db_mod.open_db(settings)
    cache = cache_mod.Cache(redis_conn.connect(settings), ttl_s=settings.cache_ttl_s)
    try:
        outcome = await apply_event(
            Event(kind="connected", user_id=USER, session_id="web", occurred_at=datetime.now(UTC))
        )
        await publish_snapshot(cache, outcome)
    finally:
        await cache.close()
        await db_mod.close_db()


class ProtocolBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.env = harness.private_env(args.name, args.redis_db)
        self.env["SESSIOND_INTROSPECTION_CLIENTS"] = ":".join(CLIENT)
        self.http_port = harness.free_port()
        self.grpc_port = harness.free_port()
        self.env["SESSIOND_GRPC_PORT"] = str(self.grpc_port)
        self.settings = harness.settings_from(self.env)
        self.logs = harness.RESULTS / "bench_logs"
        self.url = f"http://127.0.0.1:{self.http_port}"

    def run(self) -> dict[str, Any]:
        for tool in ("wrk", "h2load"):
            if shutil.which(tool) is None:
                raise SystemExit(f"{tool} is missing: apt-get install -y wrk nghttp2-client")
        asyncio.run(harness.reset(self.settings))
        asyncio.run(seed(self.settings))
        argv = ["api", "--workers", str(self.args.workers), "--port", str(self.http_port)]
        api = harness.sessiond("api", argv, self.env, self.logs).start()
        try:
            harness.wait_http(self.url + "/health/ready", api, timeout=60)
            return self._measure(api)
        finally:
            api.stop()

    def _measure(self, api: harness.Proc) -> dict[str, Any]:
        a = self.args
        bearer = token(self.settings, USER, "web")
        basic = "Basic " + base64.b64encode(":".join(CLIENT).encode()).decode()
        header = f"Authorization: Bearer {bearer}"
        pids = [api.pid, *harness.descendants(api.pid)]
        with tempfile.TemporaryDirectory() as tmp:
            lua = Path(tmp, "introspect.lua")
            lua.write_text(INTROSPECT_LUA)
            frame = Path(tmp, "check.bin")
            frame.write_bytes(check_request_frame(bearer))
            lua_env = {"BENCH_TOKEN": bearer, "BENCH_BASIC": basic}
            grpc_argv = [
                "-c16", "-m4", "-d", str(frame),
                "-H", "content-type: application/grpc", "-H", "te: trailers",
            ]  # fmt: skip
            runs: dict[str, Any] = {
                "auth_check": lambda s: wrk(
                    self.url + "/auth/check", seconds=s, connections=a.connections,
                    header=header, watch={"server": pids},
                ),
                "introspect": lambda s: wrk(
                    self.url + "/oauth2/introspect", seconds=s, connections=a.connections,
                    script=lua, env=lua_env, watch={"server": pids},
                ),
                "grpc_check": lambda s: h2load(
                    f"http://127.0.0.1:{self.grpc_port}{GRPC_PATH}", seconds=s, argv=grpc_argv
                ),
                "auth_check_h2load_h1": lambda s: h2load(
                    self.url + "/auth/check", seconds=s,
                    argv=["--h1", f"-c{a.connections}", "-m1", "-H", header],
                ),
            }  # fmt: skip
            routes = {
                "auth_check": "/auth/check",
                "introspect": "/oauth2/introspect",
                "grpc_check": GRPC_PATH,
                "auth_check_h2load_h1": "/auth/check",
            }
            for warm_up in runs.values():
                warm_up(2)
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
            for _ in range(a.rounds):
                for name, run in runs.items():
                    before = granted(self.url, routes[name])
                    result = run(a.duration)
                    result["granted"] = granted(self.url, routes[name]) - before
                    rounds[name].append(result)
        best = {name: max(r, key=lambda x: int(x["rps"])) for name, r in rounds.items()}
        out: dict[str, Any] = {name: dict(b) for name, b in best.items()}
        out["rounds"] = {name: [r["rps"] for r in rs] for name, rs in rounds.items()}
        for name, rs in rounds.items():
            # Every answer the tool counted was a grant (metrics may lag a second: allow 10 %).
            answered = [r.get("requests") or r.get("succeeded") or 0 for r in rs]
            out[name]["all_granted"] = all(
                r["granted"] >= 0.9 * n and not r.get("non_2xx") and not r.get("failed")
                for r, n in zip(rs, answered, strict=True)
            )
        base = best["auth_check"]["rps"]
        out["ratios"] = {
            "introspect_vs_auth_check": round(best["introspect"]["rps"] / base, 3),
            "grpc_vs_auth_check_wrk": round(best["grpc_check"]["rps"] / base, 3),
            "grpc_vs_auth_check_h2load": round(
                best["grpc_check"]["rps"] / best["auth_check_h2load_h1"]["rps"], 3
            ),
        }
        out["target_ratio"] = TARGET_RATIO
        out["load_average"] = harness.load_average()
        return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=int, default=8, help="seconds per run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="Sanic workers of the API")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--name", default="sessiond_bench14", help="vhost/database of the namespace")
    p.add_argument("--redis-db", type=int, default=9)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    say(f"protocols bench ... (load average {harness.load_average()})")
    out = ProtocolBench(args).run()
    for name in ("auth_check", "introspect", "grpc_check", "auth_check_h2load_h1"):
        r = out[name]
        latency = r.get("p99_ms", r.get("mean_ms"))
        say(f"{name:22} {r['rps']:>8} req/s  latency {latency} ms  all granted: {r['all_granted']}")
    for name, ratio in out["ratios"].items():
        verdict = "ok" if ratio >= TARGET_RATIO else "BELOW TARGET"
        say(f"{name:28} {ratio:>6}  (target >= {TARGET_RATIO}) {verdict}")
    harness.RESULTS.mkdir(exist_ok=True)
    text = json.dumps(out, indent=2)
    (harness.RESULTS / "bench_protocols.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
