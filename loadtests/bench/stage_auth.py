"""Stage 1: ``/auth/check`` on a cache hit against a bare Sanic route, then the revocation delay."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from loadtests import harness
from loadtests.bench.base import BenchBase
from loadtests.bench.tools import (
    BARE_APP,
    Http,
    Publisher,
    event,
    profiled,
    redis_pids,
    rss_of,
    token,
    wrk,
)


class AuthCheck(BenchBase):
    """Stage 1. A mixin of ``Bench``: it needs the running system ``BenchBase`` starts."""

    def auth_check(self) -> dict[str, Any]:
        """Both servers run side by side; wrk alternates between them (``--rounds`` rounds of
        ``--duration`` seconds each) and the best round of each counts, so that a burst of
        load from elsewhere on a shared machine does not decide the ratio alone."""
        a = self.args
        assert self.api is not None
        url = f"http://127.0.0.1:{self.api_port}"
        res: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "bare_app.py").write_text(BARE_APP)
            port = harness.free_port()
            bare = harness.Proc(
                "bare",
                [sys.executable, "-m", "sanic", "bare_app:create_app", "--factory",
                 "--host", "127.0.0.1", "--port", str(port), "--workers", str(a.workers),
                 "--no-motd"],
                {"PYTHONPATH": tmp},
                self.logs / "bare.log",
            )  # fmt: skip
            bare.start()
            try:
                harness.wait_http(f"http://127.0.0.1:{port}/ok", bare, timeout=60)
                res.update(self._auth_check_rounds(url, f"http://127.0.0.1:{port}/ok", bare))
            finally:
                bare.stop()
        res["ratio"] = round(res["auth_check"]["rps"] / res["bare"]["rps"], 3)
        res.update(self._revocation())
        return res

    def _auth_check_rounds(self, url: str, bare_url: str, bare: harness.Proc) -> dict[str, Any]:
        a = self.args
        assert self.api is not None
        pub = Publisher(self.settings)
        http = Http(self.api_port)
        try:
            # A connected user, through the real pipeline; its token then hits the cache.
            pub.publish(event("connected", "bench-hit", "web", datetime.now(UTC)))
            hit = token(self.settings, "bench-hit", "web")
            http.until("/auth/check", hit, 200)
        finally:
            http.close()
            pub.close()
        header = f"Authorization: Bearer {hit}"
        api_pids = [self.api.pid, *harness.descendants(self.api.pid)]
        bare_pids = [bare.pid, *harness.descendants(bare.pid)]
        wrk(f"{url}/auth/check", seconds=2, connections=a.connections, header=header)  # warm-up
        wrk(bare_url, seconds=2, connections=a.connections)
        rounds: dict[str, list[dict[str, Any]]] = {"auth_check": [], "bare": []}
        prof: dict[str, Any] = {}
        for i in range(a.rounds):
            with profiled(
                self.api.pid,
                a.duration,
                harness.RESULTS / "profile_api.txt",
                a.profile and i == 0,
            ) as prof_round:
                rounds["auth_check"].append(
                    wrk(
                        f"{url}/auth/check",
                        seconds=a.duration,
                        connections=a.connections,
                        header=header,
                        watch={"server": api_pids, "redis": redis_pids()},
                    )
                )
            prof = prof or prof_round
            rounds["bare"].append(
                wrk(
                    bare_url,
                    seconds=a.duration,
                    connections=a.connections,
                    watch={"server": bare_pids},
                )
            )
        res: dict[str, Any] = {
            name: max(runs, key=lambda r: int(r["rps"])) for name, runs in rounds.items()
        }
        res["rounds"] = {name: [r["rps"] for r in runs] for name, runs in rounds.items()}
        if prof:
            res["profile_api"] = prof
        res["rss_api_after_load"] = rss_of(self.api)
        return res

    def _revocation(self) -> dict[str, Any]:
        """``disconnected`` published (confirmed) → first 403 seen by a client polling at once."""
        pub = Publisher(self.settings)
        http = Http(self.api_port)
        delays: list[float] = []
        grants: list[float] = []
        try:
            for i in range(self.args.revocations):
                uid = f"bench-rev-{i}"
                tok = token(self.settings, uid, "web")
                at = datetime.now(UTC)
                started = time.perf_counter()
                pub.publish(event("connected", uid, "web", at))
                http.until("/auth/check", tok, 200)
                grants.append((time.perf_counter() - started) * 1000)
                for _ in range(20):  # a few cache hits, as a live user would have
                    http.status("/auth/check", tok)
                started = time.perf_counter()
                pub.publish(event("disconnected", uid, "web", at + timedelta(seconds=1)))
                http.until("/auth/check", tok, 403)
                delays.append((time.perf_counter() - started) * 1000)
        finally:
            http.close()
            pub.close()
        return {
            "revocation_ms": {
                "trials": len(delays),
                "median": round(statistics.median(delays), 1),
                "p90": round(sorted(delays)[int(0.9 * (len(delays) - 1))], 1),
                "max": round(max(delays), 1),
            },
            "grant_ms_median": round(statistics.median(grants), 1),
        }
