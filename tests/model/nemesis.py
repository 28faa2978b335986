"""The nemesis: faults injected while the histories run, on this worktree's stack only.

Every action targets a process this run started (the worker) or a server of *this* stack, found
the way ``sessiond.stack`` finds it (its pid file under ``SESSIOND_STACK_DIR``, its ``pg_ctl``
data directory, its ``rabbitmqctl`` node): never a process looked up by name.

- ``kill_worker``: SIGKILL the worker's whole process group, start a new one after a while.
- ``restart_rabbitmq``: ``rabbitmqctl stop`` and start (messages are durable: kept).
- ``pause_redis``: SIGSTOP the Redis server, SIGCONT it later (its data kept, like a frozen VM
  or a long GC pause; issue 11 scenario 2).
- ``stop_postgres``: ``pg_ctl stop -m fast``, start again.

Each action is recorded as a ``Fault`` window (monotonic start/end) for the checker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from sessiond import stack
from tests.model.checker import Fault
from tests.model.client import Recorder
from tests.model.generator import FAULT_KINDS, fault_plan

log = logging.getLogger(__name__)


class Service:
    """A sessiond process (API, worker, scheduler) run as an operator would run it."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.argv, self.env, self.logs = name, argv, env, logs
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with (self.logs / f"{self.name}.{self.starts}.log").open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL to the process group this run created (the worker and its children)."""
        if self.proc is not None and self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        # Children left behind by a killed main process belong to the same group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def redis_pid(cfg: stack.StackConfig) -> int:
    return int(cfg.pidfile("redis").read_text().split()[0])


class Nemesis:
    """Runs the seeded fault plan until ``stop()``; ``heal()`` brings everything back."""

    def __init__(
        self,
        cfg: stack.StackConfig,
        worker: Service,
        recorder: Recorder,
        *,
        seed: int,
        kinds: tuple[str, ...] = FAULT_KINDS,
    ) -> None:
        self.cfg, self.worker, self.recorder = cfg, worker, recorder
        self.seed, self.kinds = seed, kinds
        self.counts: Counter[str] = Counter()
        self._stopping = asyncio.Event()
        self._paused: int | None = None

    def stop(self) -> None:
        self._stopping.set()

    async def _sleep(self, seconds: float) -> bool:
        """False when stopped meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        return not self._stopping.is_set()

    async def run(self) -> None:
        index = 0
        while self.kinds and not self._stopping.is_set():
            plan = fault_plan(self.seed, index, self.kinds)
            index += 1
            if not await self._sleep(plan.after):
                return
            fault = Fault(plan.kind, time.monotonic(), detail=f"{plan.seconds:.1f} s")
            self.recorder.faults.append(fault)
            self.counts[plan.kind] += 1
            log.warning("nemesis", extra={"fault": plan.kind, "seconds": plan.seconds})
            try:
                await self._inject(plan.kind, plan.seconds)
            finally:
                await asyncio.to_thread(self._heal)
                fault.end = time.monotonic()

    async def _inject(self, kind: str, seconds: float) -> None:
        if kind == "kill_worker":
            await asyncio.to_thread(self.worker.kill)
            await asyncio.sleep(seconds)
        elif kind == "restart_rabbitmq":
            try:
                await asyncio.to_thread(stack.stop, self.cfg, "rabbitmq")
            except subprocess.TimeoutExpired:  # rabbitmqctl slow to answer: heal() waits for it
                log.warning("rabbitmqctl stop timed out")
        elif kind == "pause_redis":
            self._paused = redis_pid(self.cfg)
            os.kill(self._paused, signal.SIGSTOP)
            await asyncio.sleep(seconds)
        elif kind == "stop_postgres":
            await asyncio.to_thread(stack.stop, self.cfg, "postgres")
            await asyncio.sleep(seconds)
        else:
            raise ValueError(f"unknown fault {kind!r}")

    def _heal(self) -> None:
        """Everything back: Redis resumed, servers running, a worker running."""
        if self._paused is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._paused, signal.SIGCONT)
            self._paused = None
        for server in stack.SERVERS:
            self._ensure(server)
        if not self.worker.alive():
            self.worker.start()

    def _ensure(self, server: str, attempts: int = 3) -> None:
        """``stack.start``, patiently: on this loaded machine RabbitMQ's boot can outlast the
        stack's own readiness probe. A server still booting is waited for, never started twice."""
        for attempt in range(attempts):
            if stack.running(self.cfg, server):
                return
            try:
                stack.start(self.cfg, server)
                return
            except (stack.StackError, subprocess.TimeoutExpired) as exc:
                log.warning("start failed", extra={"server": server, "error": str(exc)[:300]})
                deadline = time.monotonic() + 60 * (attempt + 1)
                while time.monotonic() < deadline and not stack.running(self.cfg, server):
                    time.sleep(1.0)
        if not stack.running(self.cfg, server):
            raise stack.StackError(f"{server} would not start again")

    async def heal(self) -> None:
        await asyncio.to_thread(self._heal)
