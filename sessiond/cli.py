"""The ``sessiond`` command line (CONTRACT §6): one entry point for people, CI and containers."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sessiond.config import get_settings
from sessiond.logs import setup_logging
from sessiond.stack.proc import StackError

log = logging.getLogger("sessiond.cli")


def _out(text: str) -> None:
    """Command output (not logs) goes to stdout, for pipes and ``eval``."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- stack


def cmd_stack(args: argparse.Namespace) -> int:
    from sessiond import stack

    if args.cluster:
        return _cluster(args)
    cfg = stack.StackConfig.from_env()
    if args.action == "up":
        stack.up(cfg, install=not args.no_install)
        for line in cfg.env_lines(test=args.test):
            log.info("stack env", extra={"line": line})
    elif args.action == "down":
        stack.down(cfg)
    elif args.action == "status":
        states = dict(stack.status(cfg))
        _out(json.dumps({"root": str(cfg.root), "servers": states}))
        return 0 if all(states.values()) else 3
    elif args.action == "env":
        _out("\n".join(cfg.env_lines(test=args.test)))
    return 0


def _cluster(args: argparse.Namespace) -> int:
    from sessiond import stack
    from sessiond.stack import cluster

    cfg = cluster.ClusterConfig.from_env()
    if args.action == "up":
        if not args.no_install:
            stack.ensure_packages()
        cluster.up(cfg)
        for line in cluster.env_lines(cfg, test=args.test):
            log.info("stack env", extra={"line": line})
    elif args.action == "down":
        cluster.down(cfg)
    elif args.action == "status":
        servers = cluster.status(cfg)
        _out(json.dumps({"root": str(cfg.root), "servers": servers}))
        return 0 if all(s["running"] for s in servers.values()) else 3
    elif args.action == "env":
        _out("\n".join(cluster.env_lines(cfg, test=args.test)))
    return 0


# --------------------------------------------------------------------------- processes


def cmd_migrate(args: argparse.Namespace) -> int:
    from storage import db

    asyncio.run(db.migrate(get_settings()))
    log.info("migrations applied")
    return 0


def api_argv(workers: int, host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "sanic", "api.app:create_app", "--factory",
        "--host", host, "--port", str(port), "--workers", str(workers), "--no-motd",
    ]  # fmt: skip


def worker_argv(processes: int, threads: int, partitions: str | None) -> list[str]:
    from actors.topology import JOBS_QUEUE
    from sessiond.events import partition_queue

    argv = [
        sys.executable, "-m", "dramatiq", "actors.app",
        "--processes", str(processes), "--threads", str(threads),
    ]  # fmt: skip
    if partitions:
        queues = [partition_queue(int(p)) for p in partitions.split(",") if p.strip()]
        argv += ["--queues", *queues, JOBS_QUEUE]
    return argv


def scheduler_argv() -> list[str]:
    return [sys.executable, "-m", "actors.scheduler"]


def _exec(argv: list[str]) -> int:
    os.execv(argv[0], argv)  # noqa: S606 - replaces this process, as exec in a shell would
    return 0  # not reached


def cmd_api(args: argparse.Namespace) -> int:
    s = get_settings()
    return _exec(
        api_argv(args.workers or s.api_workers, args.host or s.api_host, args.port or s.api_port)
    )


def cmd_worker(args: argparse.Namespace) -> int:
    return _exec(worker_argv(args.processes, args.threads, args.partitions))


def cmd_scheduler(args: argparse.Namespace) -> int:
    return _exec(scheduler_argv())


def cmd_run(args: argparse.Namespace) -> int:
    """Everything in the foreground on the local stack; Ctrl-C (or any child dying) stops all."""
    from sessiond import stack

    cfg = stack.StackConfig.from_env()
    stack.up(cfg, install=True)
    os.environ.update(cfg.env_dict())
    get_settings.cache_clear()
    s = get_settings()
    cmd_migrate(args)
    # Each child in its own session: a terminal's Ctrl-C reaches only this process, which then
    # sends one SIGTERM to each child. (A second signal makes Dramatiq and Sanic kill instead of
    # drain, and Dramatiq kills its whole process group.)
    children = {
        name: subprocess.Popen(argv, start_new_session=True)
        for name, argv in (
            ("api", api_argv(args.api_workers, s.api_host, s.api_port)),
            ("worker", worker_argv(args.processes, args.threads, None)),
            ("scheduler", scheduler_argv()),
        )
    }
    log.info(
        "sessiond running; Ctrl-C stops it",
        extra={
            "api": f"http://{s.api_host}:{s.api_port}",
            "pids": {k: p.pid for k, p in children.items()},
        },
    )
    stopping = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    while not stopping:
        for name, proc in children.items():
            if proc.poll() is not None:
                log.error(
                    "process exited; stopping the rest",
                    extra={"process": name, "code": proc.returncode},
                )
                stopping, code = True, 1
                break
        time.sleep(0.2)
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for proc in children.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    if args.stack_down:
        stack.down(cfg)
    return code


# --------------------------------------------------------------------------- dead letters


def cmd_dlq(args: argparse.Namespace) -> int:
    from actors import deadletter

    s = get_settings()
    if args.action == "list":
        count = 0
        for letter in deadletter.listing(s, limit=args.limit):
            _out(json.dumps(letter.to_json(), default=str))
            count += 1
        log.info("dead letters listed", extra={"count": count})
    else:
        n = deadletter.replay(s, limit=args.limit, reason=args.reason)
        _out(json.dumps({"replayed": n}))
    return 0


# --------------------------------------------------------------------------- jobs by hand


def cmd_sweep(args: argparse.Namespace) -> int:
    from actors import jobs

    result = jobs.run_once("sweep", dry_run=args.dry_run)
    _out(json.dumps(result, default=str))
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    from actors import jobs

    result = jobs.run_once("flush")
    _out(json.dumps(result, default=str))
    return 0


# --------------------------------------------------------------------------- demo helpers


def cmd_token(args: argparse.Namespace) -> int:
    import jwt

    s = get_settings()
    if s.env == "production":
        log.error("sessiond token is for development only")
        return 2
    now = int(time.time())
    claims: dict[str, Any] = {"sub": args.sub, "iat": now, "exp": now + args.ttl}
    if args.sid:
        claims["sid"] = args.sid
    if args.roles:
        claims["roles"] = [r for r in args.roles.split(",") if r]
    if s.jwt_issuer:
        claims["iss"] = s.jwt_issuer
    if s.jwt_audience:
        claims["aud"] = s.jwt_audience
    _out(jwt.encode(claims, s.jwt_secret, algorithm="HS256"))
    return 0


def publish_event(body: dict[str, Any], routing_key: str = "auth") -> None:
    """Publishes as the auth service would: plain persistent JSON, publisher confirms."""
    import pika

    from sessiond import amqp

    s = get_settings()
    conn = pika.BlockingConnection(amqp.connection_parameters(s))
    try:
        ch = conn.channel()
        amqp.declare_topology(ch, s)
        ch.confirm_delivery()
        ch.basic_publish(
            s.events_exchange,
            routing_key,
            json.dumps(body).encode(),
            pika.BasicProperties(delivery_mode=2, content_type="application/json"),
            mandatory=True,
        )
    finally:
        conn.close()


def cmd_publish(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"event": args.kind, "user_id": args.user_id}
    if args.kind == "connected":
        if args.name:
            body["name"] = args.name
        if args.email:
            body["email"] = args.email
    if args.session:
        body["session_id"] = args.session
    body["occurred_at"] = datetime.now(UTC).isoformat()
    body["event_id"] = str(uuid.uuid4())
    publish_event(body)
    _out(json.dumps(body))
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sessiond", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    st = sub.add_parser("stack", help="local RabbitMQ, Redis and PostgreSQL on 127.0.0.1")
    st.add_argument("action", choices=["up", "down", "status", "env"])
    st.add_argument("--test", action="store_true", help="the test vhost, database and Redis db")
    st.add_argument("--no-install", action="store_true", help="never call apt-get")
    st.add_argument(
        "--cluster",
        action="store_true",
        help="the local cluster: 3 RabbitMQ nodes, Redis Cluster, PostgreSQL primary + standby",
    )
    st.set_defaults(func=cmd_stack)

    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)

    a = sub.add_parser("api", help="the Sanic API")
    a.add_argument("--workers", type=int)
    a.add_argument("--host")
    a.add_argument("--port", type=int)
    a.set_defaults(func=cmd_api)

    w = sub.add_parser("worker", help="Dramatiq workers (ingress + partition actors + jobs)")
    w.add_argument("--processes", type=int, default=2)
    w.add_argument("--threads", type=int, default=8)
    w.add_argument("--partitions", help="comma-separated partition numbers, e.g. 0,3")
    w.set_defaults(func=cmd_worker)

    sub.add_parser("scheduler", help="the periodic jobs").set_defaults(func=cmd_scheduler)

    r = sub.add_parser("run", help="stack + migrations + api + workers + scheduler, foreground")
    r.add_argument("--api-workers", type=int, default=2)
    r.add_argument("--processes", type=int, default=2)
    r.add_argument("--threads", type=int, default=8)
    r.add_argument("--stack-down", action="store_true", help="stop the servers on exit too")
    r.set_defaults(func=cmd_run)

    d = sub.add_parser(
        "dlq",
        help="dead-lettered events",
        description="list: one JSON line per dead letter (nothing consumed). replay: publish "
        "them again where they came from, each with the stamps the ingress first gave it, so "
        "a replayed event is never later than its first receipt and a replay of an applied "
        "event is a no-op.",
    )
    d.add_argument("action", choices=["list", "replay"])
    d.add_argument("--limit", type=int, default=None)
    d.add_argument("--reason", help="replay only letters with this reason")
    d.set_defaults(func=cmd_dlq)

    sw = sub.add_parser("sweep", help="one expiry sweep now")
    sw.add_argument("--dry-run", action="store_true", help="only list who would be expired")
    sw.set_defaults(func=cmd_sweep)
    sub.add_parser("flush", help="one activity flush now").set_defaults(func=cmd_flush)

    t = sub.add_parser("token", help="mint a development HS256 token")
    t.add_argument("--sub", required=True)
    t.add_argument("--sid")
    t.add_argument("--roles", default="")
    t.add_argument("--ttl", type=int, default=3600)
    t.set_defaults(func=cmd_token)

    pub = sub.add_parser("publish", help="publish an auth event like the auth service would")
    pub.add_argument("kind", choices=["connected", "disconnected"])
    pub.add_argument("user_id")
    pub.add_argument("--name")
    pub.add_argument("--email")
    pub.add_argument("--session")
    pub.set_defaults(func=cmd_publish)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(get_settings().log_level)
    if args.command == "dlq" and args.action == "list" and args.limit is None:
        args.limit = 100
    try:
        code: int = args.func(args)
    except StackError as exc:
        # One line that names the server and its log; the traceback would only hide it.
        log.error(str(exc), extra={"server": exc.server, "log": str(exc.logfile or "")})
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
