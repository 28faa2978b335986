"""Benchmark of the ingress alone: events forwarded per second, with and without first receipts.

N seed-form events (no ``occurred_at``, an ``event_id`` each, so every one needs a first receipt,
``actors.stamping``) are published to a queue of the bench's own before an ``Ingress`` thread
starts; the time until it has forwarded them all to the partition queues (no worker applies
them) is the measure. ``--store pg`` stores the receipts in PostgreSQL as a worker does (one
statement per batch, Tortoise on an event-loop thread); ``--store none`` hands every event its
own stamps back, which is the ingress before receipts existed. Its own database
(``sessiond_bench_ingress``); the partition queues of the stack's vhost are purged before and
after: use your own stack.

    .venv/bin/python -m loadtests.bench_ingress [--events N] [--store pg,none] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
import pika
import pika.exceptions
from dramatiq.asyncio import EventLoopThread

from actors import stamping, topology
from actors.ingress import Ingress
from actors.sources import Source
from loadtests.bench_expiry import bench_settings, prepare
from sessiond import amqp
from sessiond.config import Settings
from sessiond.events import Event, decode_event
from storage import db as db_mod
from storage.receipts import Receipt, Settled, first_of_each

QUEUE = "bench.ingress.v2"
DB = "sessiond_bench_ingress"


def settings() -> Settings:
    base = bench_settings()
    url = base.database_url.rsplit("/", 1)[0] + f"/{DB}"
    return base.model_copy(update={"database_url": url, "log_level": "WARNING"})


def source(s: Settings) -> Source:
    def decode(body: bytes, received_at: datetime, routing_key: str = "") -> Event:
        return decode_event(body, received_at=received_at, max_bytes=s.max_event_bytes)

    def declare(ch: Any) -> None:
        ch.queue_declare(QUEUE, durable=True, arguments=amqp.INGEST_QUEUE_ARGUMENTS)

    return Source(QUEUE, decode, declare, name="bench")


def own_stamps(batch: list[Receipt], _settled: Callable[[str], Settled]) -> dict[str, Receipt]:
    return {r.key: r for r in first_of_each(batch)}


def purge(s: Settings) -> None:
    conn = pika.BlockingConnection(amqp.connection_parameters(s))
    try:
        for q in [QUEUE, topology.stamp_queue(QUEUE), *topology.partition_queues(s.partitions)]:
            ch = conn.channel()
            try:
                ch.queue_purge(q)
                ch.close()
            except pika.exceptions.ChannelClosedByBroker:  # not declared yet
                pass
    finally:
        conn.close()


def publish(s: Settings, n: int) -> None:
    conn = pika.BlockingConnection(amqp.connection_parameters(s))
    try:
        ch = conn.channel()
        ch.queue_declare(QUEUE, durable=True, arguments=amqp.INGEST_QUEUE_ARGUMENTS)
        ch.tx_select()
        for i in range(n):
            kind = "connected" if i % 2 == 0 else "disconnected"
            body = {"event": kind, "user_id": f"bench-in-{i // 2}", "event_id": uuid.uuid4().hex}
            ch.basic_publish("", QUEUE, json.dumps(body).encode())
            if i % 500 == 499:
                ch.tx_commit()
        ch.tx_commit()
    finally:
        conn.close()


def round_(s: Settings, n: int, store: str, loop: EventLoopThread) -> dict[str, Any]:
    purge(s)
    publish(s, n)
    remember = stamping.on_loop(loop.run_coroutine) if store == "pg" else own_stamps
    ingress = Ingress(s, [source(s)], remember)
    started = time.perf_counter()
    ingress.start()
    try:
        while ingress.forwarded < n:
            if time.perf_counter() - started > 300:
                raise SystemExit(f"{store}: {ingress.forwarded} of {n} forwarded in 300 s")
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
    finally:
        ingress.stop()
    purge(s)
    return {"store": store, "events": n, "s": round(elapsed, 2), "events_per_s": round(n / elapsed)}


async def reset(s: Settings) -> None:
    await prepare(s)
    conn = await asyncpg.connect(s.database_url)
    try:
        await conn.execute("TRUNCATE event_receipts")
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=10_000)
    p.add_argument("--store", default="none,pg", help="comma-separated, run in this order")
    p.add_argument("--rounds", type=int, default=1, help="each store this many times, alternated")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    s = settings()
    asyncio.run(reset(s))
    loop = EventLoopThread(logging.getLogger("bench.loop"))
    loop.start(timeout=10)
    loop.run_coroutine(db_mod.open_db(s))
    results: list[dict[str, Any]] = []
    try:
        for _ in range(args.rounds):
            for store in [x.strip() for x in args.store.split(",") if x.strip()]:
                results.append(round_(s, args.events, store, loop))
    finally:
        loop.run_coroutine(db_mod.close_db())
        loop.stop()  # type: ignore[no-untyped-call]
    sys.stdout.write(json.dumps({"ingress": results}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
