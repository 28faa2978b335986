"""``--cluster``: events/s and ``/auth/check`` req/s on the local cluster next to the single-node
stack, in one run (issue 15; target: cluster events/s >= 0.5 x single-node).

The same stages run twice, on the same machine, one system under test after the other: the
single-node stack's namespace, then the local cluster (``sessiond stack up --cluster``, started
when not running): 3 RabbitMQ nodes with quorum queues and the multi-node AMQP URL, the
PostgreSQL primary with its synchronous standby through the multi-host URL, and the Redis Cluster
(``SESSIOND_REDIS_CLUSTER``).
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from loadtests import harness
from loadtests.bench.stage_events import Events
from loadtests.bench.tools import Http, Publisher, event, say, token, wrk
from sessiond.stack import cluster
from sessiond.stack.cluster_config import ClusterConfig

# What the cluster replaces in the single-node namespace's environment.
CLUSTER_KEYS = (
    "SESSIOND_AMQP_URL",
    "SESSIOND_AMQP_CA_FILE",
    "SESSIOND_QUEUE_TYPE",
    "SESSIOND_DATABASE_URL",
    "SESSIOND_REDIS_CLUSTER",
    "SESSIOND_REDIS_URL",
)


def cluster_env(args: argparse.Namespace) -> dict[str, str]:
    cfg = ClusterConfig.from_env()
    cluster.up(cfg)
    env = harness.private_env(args.name, args.redis_db)
    reach = cluster.namespace_env(cfg, args.name)
    env.update({k: reach[k] for k in CLUSTER_KEYS})
    return env


class Target(Events):
    """One system under test: its API's ``/auth/check`` on a cache hit, then stage 2's events."""

    def auth_rps(self) -> dict[str, Any]:
        a = self.args
        pub = Publisher(self.settings)
        http = Http(self.api_port)
        try:
            pub.publish(event("connected", "bench-hit", "web", datetime.now(UTC)))
            hit = token(self.settings, "bench-hit", "web")
            http.until("/auth/check", hit, 200, timeout=30)
        finally:
            http.close()
            pub.close()
        url = f"http://127.0.0.1:{self.api_port}/auth/check"
        header = f"Authorization: Bearer {hit}"
        wrk(url, seconds=2, connections=a.connections, header=header)  # warm-up
        rounds = [
            wrk(url, seconds=a.duration, connections=a.connections, header=header)
            for _ in range(a.rounds)
        ]
        best = max(rounds, key=lambda r: int(r["rps"]))
        return {"rps": best["rps"], "p50_ms": best["p50_ms"], "p99_ms": best["p99_ms"],
                "rounds": [r["rps"] for r in rounds]}  # fmt: skip


def compare(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"redis": "cluster"}
    for name, env in (("single", None), ("cluster", cluster_env(args))):
        say(f"cluster comparison: {name} (load average {harness.load_average()})")
        target = Target(args, env=env)
        try:
            target.start()
            auth = target.auth_rps()
            events = target.events()
        finally:
            target.stop()
            target.loop.close()
        out[name] = {
            "auth_check_rps": auth["rps"],
            "auth_check": auth,
            "events_per_s": events["events_per_s"],
            "raw_msgs_per_s": events["raw"]["msgs_per_s"],
            "events": events["events"],
        }
    out["events_ratio"] = round(out["cluster"]["events_per_s"] / out["single"]["events_per_s"], 3)
    out["auth_ratio"] = round(out["cluster"]["auth_check_rps"] / out["single"]["auth_check_rps"], 3)
    return out


def render(res: dict[str, Any]) -> str:
    s, c = res["single"], res["cluster"]
    events_ok = "ok" if res["events_ratio"] >= 0.5 else "MISSED"
    rows = [
        ["measure", "single node", "cluster", "ratio", "target"],
        ["events applied/s (end to end)", f"{s['events_per_s']:,}", f"{c['events_per_s']:,}",
         f"{res['events_ratio']:.2f}", f">= 0.5 {events_ok}"],
        ["  raw pika publish+consume msg/s", f"{s['raw_msgs_per_s']:,}",
         f"{c['raw_msgs_per_s']:,}", "", ""],
        ["/auth/check cache hit req/s", f"{s['auth_check_rps']:,}", f"{c['auth_check_rps']:,}",
         f"{res['auth_ratio']:.2f}", ""],
        ["  p50 / p99 ms", f"{s['auth_check']['p50_ms']} / {s['auth_check']['p99_ms']}",
         f"{c['auth_check']['p50_ms']} / {c['auth_check']['p99_ms']}", "", ""],
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.append(f"(cluster: 3 RabbitMQ nodes, quorum queues; PostgreSQL primary + synchronous "
                 f"standby; Redis {res['redis']})")  # fmt: skip
    return "\n".join(lines)
