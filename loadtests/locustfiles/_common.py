"""Helpers shared by the locustfiles (Locust skips files whose name starts with ``_``).

Runs under gevent: no asyncio and no application code here, only PyJWT, pika and the
environment (``SESSIOND_JWT_SECRET`` and friends, ``SESSIOND_AMQP_URL``, ``SESSIOND_AMQP_CA_FILE``,
``SESSIOND_EVENTS_EXCHANGE``), so that the same files run against any deployment.

- ``AmqpPublisher``: the authentication service's side, one pika ``BlockingConnection`` per Locust
  user (cooperative under gevent's monkey patching), publisher confirms and ``mandatory``; every
  publish is reported as a Locust request of type ``AMQP``.
- ``Ledger``: what the publishers sent and the broker confirmed, per user, so that the final
  PostgreSQL/Redis state can be checked after the run (``loadtests/check.py``). With
  ``--ledger-file``, the local or master process writes it at exit; workers send theirs to the
  master at the end of the test.
- ``SessiondUser``: the abstract ``FastHttpUser`` that adds the token and asserts the status.
- Gates: ``--max-fail-ratio`` and ``--max-p95-ms`` decide the exit code (1 when breached).
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import ssl
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import jwt
import pika
from locust import FastHttpUser, events
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

log = logging.getLogger("sessiond.loadtests")

LEDGER_MESSAGE = "sessiond_ledger"
ID_PREFIX = "lt"
JOURNEY = "JOURNEY"  # request_type of the custom journey metrics
AMQP = "AMQP"


@dataclass(frozen=True)
class Target:
    """Where the events go and how tokens are signed; from the ``SESSIOND_*`` environment."""

    jwt_secret: str
    jwt_issuer: str | None
    jwt_audience: str | None
    amqp_url: str
    amqp_ca_file: str | None
    exchange: str
    run_id: str

    @classmethod
    def from_env(cls) -> Target:
        env = os.environ
        return cls(
            jwt_secret=env.get("SESSIOND_JWT_SECRET", "dev-only-insecure-secret-change-me"),
            jwt_issuer=env.get("SESSIOND_JWT_ISSUER") or None,
            jwt_audience=env.get("SESSIOND_JWT_AUDIENCE") or None,
            amqp_url=env.get(
                "SESSIOND_AMQP_URL", "amqp://sessiond:sessiond@127.0.0.1:5672/sessiond"
            ),
            amqp_ca_file=env.get("SESSIOND_AMQP_CA_FILE") or None,
            exchange=env.get("SESSIOND_EVENTS_EXCHANGE", "auth.events"),
            # Every user id of a run starts with lt-<run id>-: the check looks only at those.
            run_id=env.get("SESSIOND_LOAD_RUN_ID") or uuid.uuid4().hex[:8],
        )


TARGET = Target.from_env()
PROCESS_TAG = uuid.uuid4().hex[:6]  # unique per Locust process (distributed workers included)
_ids = itertools.count(1)


def run_prefix(run_id: str | None = None) -> str:
    return f"{ID_PREFIX}-{run_id or TARGET.run_id}-"


def new_user_id(kind: str) -> str:
    """A user id no other Locust user or process will ever use in this run."""
    return f"{run_prefix()}{PROCESS_TAG}-{kind}-{next(_ids)}"


# --------------------------------------------------------------------------- tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(sub: str, *, sid: str | None = None, ttl: int = 3600, now: float | None = None) -> str:
    """An HS256 token as the identity provider would sign it."""
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": issued, "exp": issued + ttl}
    if sid is not None:
        claims["sid"] = sid
    if TARGET.jwt_issuer:
        claims["iss"] = TARGET.jwt_issuer
    if TARGET.jwt_audience:
        claims["aud"] = TARGET.jwt_audience
    return jwt.encode(claims, TARGET.jwt_secret, algorithm="HS256")


def expired_token(sub: str, *, sid: str | None = None) -> str:
    """Expired well beyond any leeway (the API's default is 30 s)."""
    return mint(sub, sid=sid, ttl=600, now=time.time() - 3600)


def tampered(token: str) -> str:
    """Same header and signature, another ``sub`` in the payload: the signature no longer fits."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = f"{claims['sub']}-admin"
    claims["roles"] = ["admin"]
    return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"


# --------------------------------------------------------------------------- ledger


@dataclass
class Expected:
    """One user's sessions after every event published so far for it, in publishing order."""

    sessions: set[str] = field(default_factory=set)
    events: int = 0
    uncertain: bool = False  # a publish was not confirmed: it may or may not have been stored
    in_flight: int = 0  # publishes started and not finished (a user stopped mid-publish)


class Ledger:
    """What this process published (confirmed by the broker) and what the answers were."""

    def __init__(self) -> None:
        self.users: dict[str, Expected] = {}
        self.confirmed = 0  # distinct events confirmed
        self.duplicates = 0  # redeliveries of a confirmed event (same event_id)
        self.failed = 0
        self.http_answers = 0  # HTTP responses that reached the API (status > 0)

    def begin(self, body: dict[str, Any]) -> None:
        self.users.setdefault(str(body["user_id"]), Expected()).in_flight += 1

    def record(self, body: dict[str, Any], *, ok: bool, duplicate: bool) -> None:
        user = self.users.setdefault(str(body["user_id"]), Expected())
        user.in_flight -= 1
        if not ok:
            self.failed += 1
            user.uncertain = True
            return
        if duplicate:
            self.duplicates += 1
            return
        self.confirmed += 1
        user.events += 1
        sid = body.get("session_id")
        if body["event"] == "connected":
            user.sessions.add(sid if sid is not None else "")
        elif sid is None:
            user.sessions.clear()  # logged out everywhere
        else:
            user.sessions.discard(sid)

    def to_json(self) -> dict[str, Any]:
        return {
            "confirmed": self.confirmed,
            "duplicates": self.duplicates,
            # Unconfirmed publishes, those cut short by the end of the run included.
            "failed": self.failed + sum(max(u.in_flight, 0) for u in self.users.values()),
            "http_answers": self.http_answers,
            "users": {
                uid: {
                    "sessions": sorted(u.sessions),
                    "events": u.events,
                    "uncertain": u.uncertain or u.in_flight > 0,
                }
                for uid, u in self.users.items()
            },
        }


LEDGER = Ledger()


def merge_ledgers(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {
        "confirmed": 0, "duplicates": 0, "failed": 0, "http_answers": 0, "users": {},
    }  # fmt: skip
    for part in parts:
        for key in ("confirmed", "duplicates", "failed", "http_answers"):
            merged[key] += int(part[key])
        merged["users"].update(part["users"])
    return merged


class _Clock:
    """Strictly increasing event times per user, so the expected final state is the state after
    the last published event whatever order the broker and the workers deliver them in."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def next(self, user_id: str) -> str:
        at = max(time.time(), self.last.get(user_id, 0.0) + 0.001)
        self.last[user_id] = at
        return datetime.fromtimestamp(at, tz=UTC).isoformat()


CLOCK = _Clock()


def event(kind: str, user_id: str, *, session_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event": kind,
        "user_id": user_id,
        "event_id": uuid.uuid4().hex,
        "occurred_at": CLOCK.next(user_id),
    }
    if kind == "connected":
        body["name"] = f"Load {user_id[-12:]}"
        body["email"] = f"{user_id}@load.example.com"
    if session_id is not None:
        body["session_id"] = session_id
    return body


# --------------------------------------------------------------------------- AMQP client


def _connection_parameters() -> pika.ConnectionParameters:
    # A cluster's SESSIOND_AMQP_URL lists its nodes: the load publishes to the first one.
    url = urlsplit(TARGET.amqp_url.split(",")[0].strip())
    host = url.hostname or "127.0.0.1"
    tls = url.scheme == "amqps"
    kwargs: dict[str, Any] = {
        "host": host,
        "port": url.port or (5671 if tls else 5672),
        "virtual_host": unquote(url.path[1:]) if len(url.path) > 1 else "/",
        "credentials": pika.PlainCredentials(
            unquote(url.username or "guest"), unquote(url.password or "guest")
        ),
        # A Locust user may stay idle longer than a heartbeat interval between publishes and a
        # BlockingConnection only answers heartbeats while it is being used.
        "heartbeat": 0,
        "blocked_connection_timeout": 30,
        "socket_timeout": 10,
    }
    if tls:
        ctx = ssl.create_default_context(cafile=TARGET.amqp_ca_file)
        kwargs["ssl_options"] = pika.SSLOptions(ctx, server_hostname=host)
    return pika.ConnectionParameters(**kwargs)


_PERSISTENT = pika.BasicProperties(delivery_mode=2, content_type="application/json")


class AmqpPublisher:
    """A Locust "client" for AMQP: each publish waits for the broker's confirm and is reported
    as a request (type ``AMQP``, name ``publish <event>``) with its latency and size."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment
        self._conn: pika.BlockingConnection | None = None
        self._channel: Any = None
        self.last: dict[str, Any] | None = None

    def _ensure(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            self.close()
            self._conn = pika.BlockingConnection(_connection_parameters())
            channel = self._conn.channel()
            channel.confirm_delivery()
            self._channel = channel
        return self._channel

    def publish(self, body: dict[str, Any], *, duplicate: bool = False) -> bool:
        data = json.dumps(body, separators=(",", ":")).encode()
        name = f"publish {body['event']}" + (" (redelivery)" if duplicate else "")
        LEDGER.begin(body)
        started = time.perf_counter()
        error: Exception | None = None
        try:
            self._ensure().basic_publish(
                TARGET.exchange, f"auth.{body['event']}", data, _PERSISTENT, mandatory=True
            )
        except Exception as exc:  # unroutable, nacked, connection lost: unknown outcome
            error = exc
            self.close()
        hooks: Any = self.environment.events
        hooks.request.fire(
            request_type=AMQP,
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=len(data),
            exception=error,
            context={},
        )
        LEDGER.record(body, ok=error is None, duplicate=duplicate)
        if error is None and not duplicate:
            self.last = body
        return error is None

    def close(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception as exc:  # closing a broken connection: nothing left to do
                log.debug("AMQP close failed: %s", exc)


def report(
    environment: Environment, name: str, started: float, *, failure: str | None = None
) -> float:
    """A custom journey metric (milliseconds since ``started``) in Locust's statistics."""
    elapsed = (time.perf_counter() - started) * 1000
    hooks: Any = environment.events
    hooks.request.fire(
        request_type=JOURNEY,
        name=name,
        response_time=elapsed,
        response_length=0,
        exception=AssertionError(failure) if failure else None,
        context={},
    )
    return elapsed


# --------------------------------------------------------------------------- HTTP users


class SessiondUser(FastHttpUser):
    """Abstract API user: ``call`` adds ``Authorization: Bearer <token>`` and marks the request as
    failed unless the status (and the JSON ``reason`` when given) is the expected one."""

    abstract = True
    token: str = ""

    def call(
        self,
        path: str,
        *,
        token: str | None = None,
        expect: int = 200,
        reason: str | None = None,
        label: str = "valid",
    ) -> int:
        headers = {"Authorization": f"Bearer {token if token is not None else self.token}"}
        with self.client.get(
            path, headers=headers, name=f"{path} [{label}]", catch_response=True
        ) as resp:
            status = int(resp.status_code or 0)
            if status != expect:
                resp.failure(f"expected {expect}, got {status}: {(resp.text or '')[:200]}")
            elif reason is not None and _reason(resp.text) != reason:
                resp.failure(f"expected reason {reason}, got {(resp.text or '')[:200]}")
            else:
                resp.success()
        return status

    def poll(self, path: str, token: str, *, until: int, bound_s: float, label: str) -> bool:
        """Repeats ``path`` until it answers ``until`` (True) or ``bound_s`` passes (False).
        Intermediate answers are expected (the pipeline is asynchronous) and count as successes
        unless they are neither 200 nor 403."""
        deadline = time.perf_counter() + bound_s
        headers = {"Authorization": f"Bearer {token}"}
        while True:
            with self.client.get(
                path, headers=headers, name=f"{path} [{label}]", catch_response=True
            ) as resp:
                status = int(resp.status_code or 0)
                if status in (200, 403):
                    resp.success()
                else:
                    resp.failure(f"unexpected {status}: {(resp.text or '')[:200]}")
            if status == until:
                return True
            if time.perf_counter() > deadline:
                return False
            time.sleep(0.002)  # gevent-patched: yields to the other users


def _reason(text: str | None) -> str | None:
    try:
        value = json.loads(text or "").get("reason")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------- run plumbing


def _arguments(parser: Any) -> None:
    parser.add_argument(
        "--ledger-file", default="", help="write what was published (for loadtests/check.py)"
    )
    parser.add_argument("--max-fail-ratio", type=float, default=0.01, help="exit 1 above this")
    parser.add_argument(
        "--max-p95-ms", type=float, default=1000.0, help="exit 1 when an HTTP/AMQP p95 is above"
    )
    parser.add_argument(
        "--revocation-bound-ms",
        type=float,
        default=2000.0,
        help="a disconnected user must be refused within this delay",
    )
    parser.add_argument(
        "--grant-bound-ms",
        type=float,
        default=15000.0,
        help="a connected user must be granted within this delay",
    )


def option(environment: Environment, name: str, default: Any) -> Any:
    options = environment.parsed_options
    return getattr(options, name, default) if options is not None else default


_worker_ledgers: dict[str, dict[str, Any]] = {}


def _init(environment: Environment, **_kw: Any) -> None:
    runner = environment.runner
    if isinstance(runner, MasterRunner):

        def on_ledger(environment: Environment, msg: Any, **_kw: Any) -> None:
            _worker_ledgers[str(msg.node_id)] = msg.data

        runner.register_message(LEDGER_MESSAGE, on_ledger)


def _count_answers(request_type: str, response: Any = None, **_kw: Any) -> None:
    if request_type not in (AMQP, JOURNEY) and int(getattr(response, "status_code", 0) or 0) > 0:
        LEDGER.http_answers += 1


def _send_ledger(environment: Environment, **_kw: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        environment.runner.send_message(LEDGER_MESSAGE, LEDGER.to_json())


def gates(environment: Environment) -> dict[str, Any]:
    """Failure ratio over everything, p95 of every HTTP and AMQP entry (journey metrics have
    their own bounds and fail individually)."""
    stats = environment.stats
    max_ratio = float(option(environment, "max_fail_ratio", 0.01))
    max_p95 = float(option(environment, "max_p95_ms", 1000.0))
    breaches: list[str] = []
    ratio = stats.total.fail_ratio
    if ratio > max_ratio:
        breaches.append(f"failure ratio {ratio:.4f} > {max_ratio}")
    p95s: dict[str, float] = {}
    for (name, method), entry in sorted(stats.entries.items()):
        if entry.num_requests == 0:
            continue
        p95 = float(entry.get_response_time_percentile(0.95))
        p95s[f"{method} {name}"] = p95
        if method != JOURNEY and p95 > max_p95:
            breaches.append(f"p95 of {method} {name} is {p95:.0f} ms > {max_p95:.0f} ms")
    if stats.total.num_requests == 0:
        breaches.append("no request at all")
    return {
        "requests": stats.total.num_requests,
        "failures": stats.total.num_failures,
        "fail_ratio": round(ratio, 5),
        "p95_ms": p95s,
        "breaches": breaches,
    }


def _finish(environment: Environment, **_kw: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    verdict = gates(environment)
    for breach in verdict["breaches"]:
        log.error("gate breached: %s", breach)
    environment.process_exit_code = 1 if verdict["breaches"] else 0
    path = option(environment, "ledger_file", "")
    if not path:
        return
    if isinstance(environment.runner, MasterRunner):
        ledger = merge_ledgers(list(_worker_ledgers.values()))
        ledger["workers_reported"] = len(_worker_ledgers)
    else:
        ledger = LEDGER.to_json()
        ledger["workers_reported"] = 0
    ledger["run_id"] = TARGET.run_id
    ledger["prefix"] = run_prefix()
    ledger["gates"] = verdict
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(ledger))


# Registered once: this module is imported (as ``loadtests.locustfiles._common``) by every
# locustfile of the directory. Locust's hooks are untyped, hence ``Any``.
_hooks: Any = events
_hooks.init_command_line_parser.add_listener(_arguments)
_hooks.init.add_listener(_init)
_hooks.request.add_listener(_count_answers)
_hooks.test_stop.add_listener(_send_ledger)
_hooks.quitting.add_listener(_finish)
