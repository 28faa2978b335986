"""Stage 2: events applied per second end to end against raw pika on the same broker."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pika

from loadtests import harness
from loadtests.bench.base import BenchBase
from loadtests.bench.tools import (
    event,
    profiled,
    publish_batches,
    rss_of,
)
from sessiond import amqp


class Events(BenchBase):
    """Stage 2. A mixin of ``Bench``: it needs the running system ``BenchBase`` starts."""

    def events(self) -> dict[str, Any]:
        a = self.args
        assert self.worker is not None
        # Per user: web connects first and stays, mobile toggles; every user ends connected
        # (on web at least), which stage 3 relies on.
        t0 = datetime.now(UTC)
        bodies: list[bytes] = []
        for k in range(a.events_per_user):
            for u in range(a.event_users):
                uid = f"bench-ev-{u}"
                at = t0 + timedelta(milliseconds=k)
                if k == 0:
                    body = event("connected", uid, "web", at)
                elif k % 2:
                    body = event("connected", uid, "mobile", at)
                else:
                    body = event("disconnected", uid, "mobile", at)
                bodies.append(json.dumps(body).encode())
        n = len(bodies)
        res: dict[str, Any] = {"events": n, "users": a.event_users}

        base = self.processed()
        with profiled(
            self.worker.pid, a.profile_s, harness.RESULTS / "profile_worker.txt", a.profile
        ) as prof:
            started = time.perf_counter()
            worker_pids = [self.worker.pid, *harness.descendants(self.worker.pid)]
            cpu_before = {p: harness.cpu_seconds(p) for p in worker_pids}
            res["publish_s"] = round(
                publish_batches(self.settings, self.settings.events_exchange, "auth.bench", bodies),
                2,
            )
            harness.wait_for(
                lambda: self.processed() >= base + n,
                timeout=a.events_timeout,
                what=f"{n} events applied",
                interval=0.05,
            )
            elapsed = time.perf_counter() - started
            used = sum(harness.cpu_seconds(p) - c for p, c in cpu_before.items())
        res["applied_s"] = round(elapsed, 2)
        res["events_per_s"] = round(n / elapsed)
        res["worker_cpu_pct"] = round(used / elapsed * 100)
        if prof:
            res["profile_worker"] = prof
        res["rss_worker_after_load"] = rss_of(self.worker)
        # Stage 3 counts PostgreSQL writes: no worker may write meanwhile, and their pooled
        # backends report pending statistics when they end.
        self.worker.stop()
        res["raw"] = self.raw_pika(bodies)
        res["ratio"] = round(res["events_per_s"] / res["raw"]["msgs_per_s"], 3)
        return res

    def raw_pika(self, bodies: list[bytes]) -> dict[str, Any]:
        """Publish (same transactions) + consume + ack per message, one consumer, same broker."""
        queue = "bench.raw"
        settings = self.settings
        with harness.amqp_channel(settings) as ch:
            ch.queue_delete(queue)
            amqp.declare_queue(ch, settings, queue)  # the type sessiond's queues have
        n = len(bodies)
        done = threading.Event()
        ready = threading.Event()
        finished: list[float] = []

        def consume() -> None:
            conn = pika.BlockingConnection(amqp.connection_parameters(settings))
            ch = conn.channel()
            ch.basic_qos(prefetch_count=100)
            seen = 0

            def on_message(c: Any, method: Any, _props: Any, _body: bytes) -> None:
                nonlocal seen
                c.basic_ack(method.delivery_tag)
                seen += 1
                if seen >= n:
                    finished.append(time.perf_counter())
                    c.stop_consuming()

            ch.basic_consume(queue, on_message)
            ready.set()
            ch.start_consuming()
            conn.close()
            done.set()

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        ready.wait(10)
        started = time.perf_counter()
        publish_s = publish_batches(settings, "", queue, bodies)
        if not done.wait(120):
            raise TimeoutError("raw consumer did not get every message")
        elapsed = finished[0] - started
        with harness.amqp_channel(settings) as ch:
            ch.queue_delete(queue)
        return {
            "publish_s": round(publish_s, 2),
            "s": round(elapsed, 2),
            "msgs_per_s": round(n / elapsed),
        }
