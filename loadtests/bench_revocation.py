"""Revocation delay per source (issue 13): how long a token stays granted once its session ends.

    .venv/bin/python -m loadtests.bench_revocation [--trials 30]

Every trial: a user logged in on two sessions (both granted, then a few cache hits on the first,
as a live user has), then the first session ended by one source; the delay runs from the publish
(or the request sent) to the first answer other than 200 for that session's token, seen by a
client polling ``/auth/check`` at once. The second session must still be granted afterwards;
a trial where it is not, or where nothing is refused within ``--timeout``, is a failure. The
sources take turns trial by trial, so that a burst of load from elsewhere hits all of them alike.

1. ``auth_disconnected``: the auth service's ``disconnected`` (seed form, publisher confirms;
   the publish returns once the broker has it), as stage 1 of ``loadtests.bench`` measures;
2. ``keycloak_admin_session_delete``: Keycloak's admin ``USER_SESSION DELETE``, published as the
   plugin does (``loadtests.keycloak_plugin``: ``amq.topic``, pretty JSON, transient, no
   confirms); sessiond looks the session's owner up;
3. ``keycloak_logout``: Keycloak's client ``LOGOUT`` of that session, published the same way;
4. ``backchannel_logout``: ``POST /oidc/backchannel-logout`` of an RS256 ``logout_token``
   (``sub`` and ``sid``) signed with a key of the API's JWKS; answered after the commit;
5. ``admin_delete_session``: ``DELETE /admin/sessions/<sid>`` with an ``admin`` token (owner
   looked up); answered after the commit.

The API and workers run as ``sessiond api`` / ``sessiond worker`` in a namespace of their own
(vhost and database ``sessiond_bench_revocation``, Redis db 6), the workers consuming Keycloak's
``amq.topic`` too, the API with back-channel logout on. One JSON line per source on stdout; the
whole run in ``results/bench_revocation.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pika
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from api.logout_token import EVENT
from loadtests import harness
from loadtests import keycloak_plugin as kc
from loadtests.bench.base import BenchBase
from loadtests.bench.report import machine
from loadtests.bench.tools import Http, Publisher, event, say, token

ISSUER = "https://sso.bench.example.com/realms/myrealm"
AUDIENCE = "sessiond-bench-rp"
KID = "bench-rsa-1"
CACHE_HITS = 20
SOURCES = (
    "auth_disconnected",
    "keycloak_admin_session_delete",
    "keycloak_logout",
    "backchannel_logout",
    "admin_delete_session",
)


class TrialFailed(Exception):
    """One trial that does not count: ``kind`` says why."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def jwks(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    return {"keys": [{**data, "kid": KID, "alg": "RS256", "use": "sig"}]}


def bench_env(args: argparse.Namespace, jwks_file: Path) -> dict[str, str]:
    """The private namespace, with the Keycloak input (default bindings: client and admin
    events) and back-channel logout on; bearer tokens stay HS256 with the bench's secret."""
    env = harness.private_env(args.name, args.redis_db)
    env.update(
        {
            "SESSIOND_KEYCLOAK_EXCHANGE": kc.EXCHANGE,
            "SESSIOND_JWKS_FILE": str(jwks_file),
            "SESSIOND_BACKCHANNEL_AUDIENCE": AUDIENCE,
            "SESSIOND_BACKCHANNEL_ISSUER": ISSUER,
        }
    )
    return env


def summary(
    source: str, delays: list[float], failures: Counter[str], statuses: Counter[int]
) -> dict[str, Any]:
    out: dict[str, Any] = {"source": source, "trials": len(delays)}
    if delays:
        ordered = sorted(delays)
        out["median_ms"] = round(statistics.median(ordered), 1)
        out["p90_ms"] = round(ordered[int(0.9 * (len(ordered) - 1))], 1)
        out["max_ms"] = round(ordered[-1], 1)
    out["failures"] = sum(failures.values())
    out["failure_kinds"] = dict(failures)
    out["refused_with"] = {str(k): v for k, v in sorted(statuses.items())}
    return out


class Revocations:
    """The clients of one run: the auth service's publisher, Keycloak's plugin, the identity
    provider and the administrator (one keep-alive connection), the polling client."""

    def __init__(self, system: BenchBase, key: rsa.RSAPrivateKey, timeout: float) -> None:
        self.settings = system.settings
        self.key = key
        self.timeout = timeout
        self.pub = Publisher(self.settings)
        self.plugin = kc.Plugin(self.settings)
        self.poll = Http(system.api_port)
        self.sender = http.client.HTTPConnection("127.0.0.1", system.api_port, timeout=5)
        self.admin_token = jwt.encode(
            {"sub": "bench-admin", "roles": ["admin"], "iat": int(time.time()),
             "exp": int(time.time()) + 86_400},
            self.settings.jwt_secret, algorithm="HS256",
        )  # fmt: skip
        self.ends: dict[str, Callable[[str, str], None]] = {
            "auth_disconnected": self.auth_disconnected,
            "keycloak_admin_session_delete": self.keycloak_admin_session_delete,
            "keycloak_logout": self.keycloak_logout,
            "backchannel_logout": self.backchannel_logout,
            "admin_delete_session": self.admin_delete_session,
        }

    def close(self) -> None:
        self.poll.close()
        self.sender.close()
        self.plugin.close()
        self.pub.close()

    # -- one trial
    def trial(self, source: str) -> tuple[float, int]:
        """Milliseconds from the end's start to the first refusal, and the refusal's status."""
        uid, s1, s2 = f"rev-{uuid.uuid4().hex[:12]}", f"s1-{uuid.uuid4()}", f"s2-{uuid.uuid4()}"
        self.login(source, uid, (s1, s2))
        t1, t2 = token(self.settings, uid, s1), token(self.settings, uid, s2)
        for _ in range(CACHE_HITS):
            self.poll.status("/auth/check", t1)
        started = time.perf_counter()
        self.ends[source](uid, s1)
        while (status := self.poll.status("/auth/check", t1)) == 200:
            if time.perf_counter() - started > self.timeout:
                raise TrialFailed("still_granted")
        took = (time.perf_counter() - started) * 1000
        if self.poll.status("/auth/check", t2) != 200:
            raise TrialFailed("other_session_refused")
        return took, status

    def login(self, source: str, uid: str, sids: tuple[str, ...]) -> None:
        for sid in sids:
            if source.startswith("keycloak"):
                self.plugin.client("LOGIN", uid, sid)
            else:
                self.pub.publish(event("connected", uid, sid, datetime.now(UTC)))
        for sid in sids:
            try:
                self.poll.until("/auth/check", token(self.settings, uid, sid), 200, timeout=30)
            except TimeoutError:
                raise TrialFailed("login_not_granted") from None

    # -- the sources
    def auth_disconnected(self, uid: str, sid: str) -> None:
        later = datetime.now(UTC) + timedelta(seconds=1)  # after the login, as in stage 1
        self.pub.publish(event("disconnected", uid, sid, later))

    def keycloak_admin_session_delete(self, uid: str, sid: str) -> None:
        self.plugin.admin(kc.session_delete(sid))

    def keycloak_logout(self, uid: str, sid: str) -> None:
        self.plugin.client("LOGOUT", uid, sid, ago_s=0)

    def backchannel_logout(self, uid: str, sid: str) -> None:
        now = int(time.time())
        claims = {
            "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 120,
            "jti": str(uuid.uuid4()), "events": {EVENT: {}}, "sub": uid, "sid": sid,
        }  # fmt: skip
        logout = jwt.encode(
            claims, self.key, algorithm="RS256", headers={"typ": "logout+jwt", "kid": KID}
        )
        body = urllib.parse.urlencode({"logout_token": logout})
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        self.send("POST", "/oidc/backchannel-logout", body, headers)

    def admin_delete_session(self, uid: str, sid: str) -> None:
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        self.send("DELETE", f"/admin/sessions/{urllib.parse.quote(sid)}", None, headers)

    def send(self, method: str, path: str, body: str | None, headers: dict[str, str]) -> None:
        self.sender.request(method, path, body=body, headers=headers)
        resp = self.sender.getresponse()
        resp.read()
        if resp.status != 200:
            raise TrialFailed(f"{method.lower()}_answered_{resp.status}")


def keycloak_consumed(settings: Any) -> bool:
    """sessiond's Keycloak queue exists and has a consumer (the workers finished booting)."""
    with harness.amqp_channel(settings) as ch:
        try:
            ok = ch.queue_declare(settings.keycloak_queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            return False
        if not ok.method.consumer_count:
            return False
        ch.queue_purge(settings.keycloak_queue)  # a previous run's leftovers
        return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sources = [s for s in SOURCES if not args.only or s in args.only.split(",")]
    delays: dict[str, list[float]] = {s: [] for s in sources}
    failures: dict[str, Counter[str]] = {s: Counter() for s in sources}
    statuses: dict[str, Counter[int]] = {s: Counter() for s in sources}
    out: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average": {"start": harness.load_average()},
        "settings": {k: v for k, v in vars(args).items() if k != "json_out"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        jwks_file = Path(tmp, "jwks.json")
        jwks_file.write_text(json.dumps(jwks(key)))
        system = BenchBase(args, bench_env(args, jwks_file))
        clients: Revocations | None = None
        try:
            system.start()
            harness.wait_for(lambda: keycloak_consumed(system.settings), timeout=60,
                             what="the Keycloak queue's consumer", interval=0.5)  # fmt: skip
            clients = Revocations(system, key, args.timeout)
            for source in sources:  # warm-up: first connections, first statements
                for _ in range(args.warmup):
                    try:
                        clients.trial(source)
                    except TrialFailed as exc:
                        say(f"warm-up trial of {source} failed: {exc.kind}")
            for i in range(args.trials):
                for source in sources:
                    try:
                        took, status = clients.trial(source)
                    except TrialFailed as exc:
                        failures[source][exc.kind] += 1
                        continue
                    delays[source].append(took)
                    statuses[source][status] += 1
                if (i + 1) % 10 == 0:
                    say(f"{i + 1}/{args.trials} trials (load average {harness.load_average()})")
        finally:
            if clients is not None:
                clients.close()
            system.stop()
            system.loop.close()
    out["load_average"]["end"] = harness.load_average()
    out["sources"] = [summary(s, delays[s], failures[s], statuses[s]) for s in sources]
    out["delays_ms"] = {s: [round(d, 2) for d in delays[s]] for s in sources}
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench_revocation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--trials", type=int, default=30, help="counted trials per source")
    p.add_argument("--warmup", type=int, default=1, help="uncounted trials per source first")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SOURCES)}")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds until a trial fails")
    p.add_argument("--name", default="sessiond_bench_revocation", help="vhost and database")
    p.add_argument("--redis-db", type=int, default=6)
    p.add_argument("--workers", type=int, default=2, help="API workers")
    p.add_argument("--processes", type=int, default=2, help="worker processes")
    p.add_argument("--threads", type=int, default=4, help="threads per worker process")
    p.add_argument("--json-out", type=Path, default=harness.RESULTS / "bench_revocation.json")
    args = p.parse_args(argv)
    unknown = {s for s in args.only.split(",") if s} - set(SOURCES)
    if unknown:
        p.error(f"unknown sources: {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    harness.RESULTS.mkdir(exist_ok=True)
    started = time.monotonic()
    out = run(args)
    out["total_s"] = round(time.monotonic() - started, 1)
    args.json_out.write_text(json.dumps(out, indent=2))
    for line in out["sources"]:
        print(json.dumps(line))
    return 0 if not any(s["failures"] for s in out["sources"]) else 1


if __name__ == "__main__":
    sys.exit(main())
