"""The system under test: one private namespace, its API and workers."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import asyncpg

from loadtests import harness
from loadtests.bench.tools import Loop


class BenchBase:
    """The system under test (API and workers of one private namespace) and the helpers the
    stages share; each stage is a mixin below, ``Bench`` joins them."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str] | None = None) -> None:
        self.args = args
        # ``env``: another system under test (the local cluster: ``stage_cluster``)
        self.env = env if env is not None else harness.private_env(args.name, args.redis_db)
        self.settings = harness.settings_from(self.env)
        self.loop = Loop()
        self.logs = harness.RESULTS / "bench_logs"
        self.api: harness.Proc | None = None
        self.worker: harness.Proc | None = None
        self.api_port = 0
        self.out: dict[str, Any] = {}

    # -- processes
    def start(self) -> None:
        self.loop.run(harness.reset(self.settings))
        self.api_port = harness.free_port()
        self.api = harness.sessiond(
            "api",
            ["api", "--workers", str(self.args.workers), "--port", str(self.api_port)],
            self.env,
            self.logs,
        ).start()
        self.worker = harness.sessiond(
            "worker",
            [
                "worker",
                "--processes",
                str(self.args.processes),
                "--threads",
                str(self.args.threads),
            ],
            self.env,
            self.logs,
        ).start()
        harness.wait_http(f"http://127.0.0.1:{self.api_port}/health/ready", self.api, timeout=60)

    def stop(self) -> None:
        for proc in (self.api, self.worker):
            if proc is not None:
                proc.stop()

    def processed(self) -> int:
        async def count() -> int:
            conn = await asyncpg.connect(self.settings.database_url)
            try:
                return int(await conn.fetchval("SELECT count(*) FROM processed_events"))
            finally:
                await conn.close()

        return self.loop.run(count())

    def sessiond_cli(self, *args: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "sessiond.cli", *args],
            env={**os.environ, **self.env}, cwd=harness.ROOT, capture_output=True, text=True,
            timeout=300, check=True,
        )  # fmt: skip
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result
