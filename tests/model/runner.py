"""One run: the histories played against the real system while the nemesis strikes, then the
check. ``run()`` returns the report; ``python -m tests.model`` prints it.

Each history is played by a ``Player``: its steps (events published, admin disconnects, idle
periods, probes), then, until the run ends, probes of all its tokens every few seconds. Those
later probes keep the user's activity fresh (a user the model says is connected must stay so in
PostgreSQL, not idle out) and are where a logout that never took effect shows up: a 200 after the
logout's revocation bound. A history leaves that phase a few rounds after every one of its
operations became due, so that long runs keep a bounded request rate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.model.checker import Bounds, Checker, Fault, PgUser, Request, Violation, deadline
from tests.model.client import Http, Publisher, Recorder, mint
from tests.model.cluster_system import system_for
from tests.model.generator import FAULT_KINDS, History, Probe, Step, history
from tests.model.model import Op
from tests.model.nemesis import Nemesis
from tests.model.system import EXPIRY_PERIOD_S, IDLE_TIMEOUT_S, JWT_SECRET, ROOT, System

log = logging.getLogger(__name__)

KEEPALIVE_S = 2.5  # well under the idle timeout
POST_DUE_ROUNDS = 2
ADMIN_RETRY_S = 90.0
SETTLE_MAX_S = 180.0  # a history whose operations are not all due by then is reported


@dataclass(frozen=True, slots=True)
class RunConfig:
    minutes: float
    seed: int
    concurrency: int = 8
    api_workers: int = 2
    faults: tuple[str, ...] = FAULT_KINDS
    cluster: bool = False  # the local cluster (tests.model.cluster_system), not the stack


@dataclass
class Report:
    config: RunConfig
    histories: int = 0
    requests: Counter[int | None] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations


class Context:
    """What every player shares."""

    def __init__(self, http: Http, publisher: Publisher, recorder: Recorder, bounds: Bounds):
        self.http, self.publisher, self.recorder, self.bounds = http, publisher, recorder, bounds
        self.finish = asyncio.Event()  # the run is over: stop keep-alive probes
        self.admin_token = mint(JWT_SECRET, "model-admin", roles=["admin"])
        self.admin_answers: Counter[int | str | None] = Counter()
        self.indeterminate: set[str] = set()
        self.unsettled: set[str] = set()


class Player:
    def __init__(self, spec: History, ctx: Context) -> None:
        self.spec, self.ctx = spec, ctx
        self.user = spec.user
        self.sent: list[tuple[dict[str, Any], Op]] = []
        self.ops: list[Op] = []
        self.held: tuple[dict[str, Any], Op] | None = None
        self.hold_next = False
        self.last_wall = 0.0
        self.count = 0
        self.rng = random.Random(f"player/{spec.user}")  # timing jitter only

    # ------------------------------------------------------------------ events

    def wall(self) -> float:
        """``occurred_at`` of a timed event: now, strictly after every earlier one."""
        t = round(time.time(), 6)
        if t <= self.last_wall:
            t = round(self.last_wall + 2e-6, 6)
        self.last_wall = t
        return t

    def event(self, connected: bool, session: str | None, with_id: bool) -> None:
        self.count += 1
        body: dict[str, Any] = {
            "event": "connected" if connected else "disconnected",
            "user_id": self.user,
        }
        if session is not None:
            body["session_id"] = session
        if connected:
            body["name"], body["email"] = f"Model {self.user}", f"{self.user}@example.com"
        if with_id:
            body["event_id"] = f"{self.user}-{self.count}"
        template = Op(
            self.user,
            "connect" if connected else "disconnect",
            0.0,
            session,
            body.get("event_id"),
            label="login" if connected else "logout",
        )
        if self.spec.timed:
            template.order = self.wall()
            template.touch_lo = template.touch_hi = time.monotonic()
            body["occurred_at"] = datetime.fromtimestamp(template.order, tz=UTC).isoformat()
        self.sent.append((body, template))
        if self.hold_next:
            self.hold_next, self.held = False, (body, template)
            return
        self.publish(body, template)
        if self.held is not None:
            held, self.held = self.held, None
            self.publish(*held, label="late")

    def publish(self, body: dict[str, Any], template: Op, *, label: str = "") -> None:
        op = Op(
            template.user, template.kind, template.order, template.session, template.event_id,
            invoked=time.monotonic(), touch_lo=template.touch_lo, touch_hi=template.touch_hi,
            label=label or template.label,
        )  # fmt: skip
        if not self.spec.timed:
            op.order = float(self.ctx.recorder.next_seq())
        self.ops.append(op)
        self.ctx.recorder.ops.append(op)
        self.ctx.publisher.submit(body, [op])

    # ------------------------------------------------------------------ other steps

    async def admin(self) -> None:
        """Until it answers 200, or an error answer is found to have committed anyway (then it
        is not sent again: a second disconnect would repair what the first left behind, e.g. a
        cache entry its failed eviction left, issue 11 scenario 2)."""
        invoked = time.monotonic()
        path = f"/admin/users/{self.user}/disconnect"
        while True:
            sent_at = time.time()
            answer = await self.ctx.http.call("POST", path, self.ctx.admin_token)
            self.ctx.admin_answers[answer.status] += 1
            if answer.status == 200:
                break
            if answer.status != 404 and await self.admin_committed(sent_at):
                self.ctx.admin_answers["committed anyway"] += 1
                break
            if time.monotonic() - invoked > ADMIN_RETRY_S:
                self.ctx.indeterminate.add(self.user)
                op = Op(self.user, "admin", self.wall(), invoked=invoked, label="admin (gave up)")
                self.ops.append(op)
                self.ctx.recorder.ops.append(op)
                return
            await asyncio.sleep(0.5)
        completed = time.monotonic()
        op = Op(self.user, "admin", self.wall(), invoked=invoked, completed=completed)
        op.label = "admin"
        self.ops.append(op)
        self.ctx.recorder.ops.append(op)

    async def admin_committed(self, sent_at: float) -> bool:
        """Whether PostgreSQL shows sessions ended by an admin since ``sent_at`` (wall clock);
        ``GET /admin/users/<id>`` reads PostgreSQL only, so it answers while Redis is away."""
        deadline = time.monotonic() + ADMIN_RETRY_S
        while time.monotonic() < deadline:
            answer = await self.ctx.http.call(
                "GET", f"/admin/users/{self.user}", self.ctx.admin_token
            )
            if answer.status == 200:
                return any(
                    s.get("end_reason") == "admin"
                    and s.get("ended_at")
                    and datetime.fromisoformat(str(s["ended_at"])).timestamp() >= sent_at - 1e-3
                    for s in answer.body.get("sessions", [])
                )
            await asyncio.sleep(0.5)
        return False

    async def probe(self, probe: Probe) -> None:
        invoked = time.monotonic()
        # A fresh token each time, as a client refreshing its access token: the token fence
        # (CONTRACT §8) revokes tokens issued before a logout everywhere.
        token = mint(JWT_SECRET, self.user, sid=probe.session)
        answer = await self.ctx.http.call("GET", probe.route, token)
        reason = str(answer.body.get("reason") or answer.body.get("error") or "")
        mine = answer.body.get("user_id") == self.user
        if answer.status == 200 and probe.route == "/api/me" and not mine:
            reason = f"body user_id {answer.body.get('user_id')!r}"
            answer.status = 299  # a 200 for someone else: flagged as a bad status
        done = time.monotonic()
        request = Request(self.user, probe.session, probe.route, invoked, done, answer.status)
        request.reason = reason
        self.ctx.recorder.requests.append(request)

    async def step(self, step: Step) -> None:
        if step.action == "login":
            self.event(True, step.session, step.with_id)
        elif step.action == "logout":
            self.event(False, step.session, step.with_id)
        elif step.action == "logout_all":
            self.event(False, None, step.with_id)
        elif step.action == "burst":
            self.event(True, step.session, step.with_id)
            self.event(False, step.session, step.with_id)
        elif step.action in ("dup", "replay") and self.sent:
            index = -1 if step.action == "dup" else step.pick % len(self.sent)
            self.publish(*self.sent[index], label=step.action)
        elif step.action == "late":
            self.hold_next = True
        elif step.action == "admin":
            await self.admin()
        elif step.action == "idle":
            await asyncio.sleep(IDLE_TIMEOUT_S + EXPIRY_PERIOD_S + 2)
        elif step.action == "probe":
            for p in step.probes:
                await self.probe(p)
        elif step.action == "pause":
            await asyncio.sleep(step.seconds)

    def due(self) -> float:
        """When every operation must be visible; an admin disconnect that was given up on never
        completes and is left out (its user's final state is not checked)."""
        faults = self.ctx.recorder.faults
        done = [op for op in self.ops if op.completed is not None or op.kind != "admin"]
        return max((deadline(op.completed, faults, self.ctx.bounds) for op in done), default=0)

    async def play(self, stepping: asyncio.Semaphore) -> None:
        async with stepping:
            for step in self.spec.steps:
                await self.step(step)
            if self.held is not None:
                held, self.held = self.held, None
                self.publish(*held, label="late")
        rounds_after_due = 0
        settle_until = time.monotonic() + SETTLE_MAX_S
        while not self.ctx.finish.is_set() and rounds_after_due < POST_DUE_ROUNDS:
            if time.monotonic() > settle_until:
                # Faults kept extending its bound (or a publish never confirmed): reported.
                self.ctx.unsettled.add(self.user)
                break
            if time.monotonic() > self.due():
                rounds_after_due += 1
            for sid in self.spec.tokens():
                await self.probe(Probe(sid, "/auth/check"))
            await asyncio.sleep(KEEPALIVE_S * self.rng.uniform(0.6, 1.0))


async def play_all(cfg: RunConfig, ctx: Context, nemesis: Nemesis, run_tag: str) -> int:
    """Starts histories until the run's time is up; returns how many ran."""
    stepping = asyncio.Semaphore(cfg.concurrency)
    ends = time.monotonic() + cfg.minutes * 60
    nemesis_task = asyncio.create_task(nemesis.run(), name="nemesis")
    players: list[asyncio.Task[None]] = []
    index = 0
    while time.monotonic() < ends:
        if stepping.locked():
            await asyncio.sleep(0.05)
            continue
        player = Player(history(cfg.seed, index, run=run_tag), ctx)
        players.append(asyncio.create_task(player.play(stepping), name=player.user))
        index += 1
        await asyncio.sleep(0.05)
    nemesis.stop()
    await nemesis_task
    await nemesis.heal()
    ctx.recorder.histories = index
    # Every history keeps probing until all of its operations are due, plus a few rounds.
    await asyncio.gather(*players)
    return index


async def keep_probing(ctx: Context, specs: list[History]) -> None:
    """Probes every history's tokens until ``ctx.finish`` (during the final quiescence)."""
    players = [Player(s, ctx) for s in specs]
    while not ctx.finish.is_set():
        for p in players:
            for sid in p.spec.tokens():
                await p.probe(Probe(sid, "/auth/check"))
        await asyncio.sleep(0.5)


def run(cfg: RunConfig, logs: Path | None = None) -> Report:
    started = time.monotonic()
    run_tag = f"s{cfg.seed}"
    logs = logs or ROOT / "results" / "model" / run_tag
    system = system_for(logs, cluster=cfg.cluster)
    settings = system.prepare()
    prepared = time.monotonic()
    system.start(api_workers=cfg.api_workers)
    ready = time.monotonic()
    publisher = Publisher(settings)
    publisher.start()
    recorder = Recorder()
    bounds = Bounds(idle_timeout_s=IDLE_TIMEOUT_S)
    report = Report(cfg)
    assert system.worker is not None
    try:
        end, final, dead, quiet = asyncio.run(
            _run_async(cfg, system, publisher, recorder, bounds, report, run_tag)
        )
    finally:
        publisher.stop()
        system.stop()
    report.histories = recorder.histories
    report.requests = Counter(r.status for r in recorder.requests)
    checker = Checker(
        recorder.ops,
        recorder.requests,
        recorder.faults,
        bounds,
    )
    report.violations = checker.check(final, end, skip_final=set(report.unchecked))
    dump(logs / "history.jsonl", recorder, final)
    if dead:
        report.violations.append(
            Violation("dead_lettered", "-", end, f"{dead} valid events were dead-lettered")
        )
    if not quiet:
        report.violations.append(
            Violation("no_quiescence", "-", end, "events still queued after 120 s")
        )
    report.seconds = time.monotonic() - started
    report.notes.append(
        f"set-up {prepared - started:.0f} s (stack, namespace, migrations),"
        f" processes ready {ready - prepared:.0f} s"
    )
    return report


def dump(path: Path, recorder: Recorder, final: dict[str, PgUser]) -> None:
    """The whole history, one JSON object a line, for looking into a violation afterwards."""
    with path.open("w") as out:
        items: list[Fault | Op | Request] = [*recorder.faults, *recorder.ops, *recorder.requests]
        for item in items:
            out.write(json.dumps({"type": type(item).__name__, **asdict(item)}) + "\n")
        for user, pg in sorted(final.items()):
            row: dict[str, Any] = {"type": "PgUser", "user": user, "status": pg.status}
            row |= {"open": sorted(pg.open), "ended_idle": sorted(pg.ended_idle)}
            out.write(json.dumps(row) + "\n")


async def _run_async(
    cfg: RunConfig,
    system: System,
    publisher: Publisher,
    recorder: Recorder,
    bounds: Bounds,
    report: Report,
    run_tag: str,
) -> tuple[float, dict[str, PgUser], int, bool]:
    assert system.worker is not None
    ctx = Context(Http("127.0.0.1", system.port), publisher, recorder, bounds)
    nemesis = system.nemesis(recorder, seed=cfg.seed, kinds=cfg.faults)
    began = time.monotonic()
    count = await play_all(cfg, ctx, nemesis, run_tag)
    played = time.monotonic()
    report.faults = nemesis.counts
    if not await asyncio.to_thread(publisher.drain, 120):
        report.notes.append(f"{publisher.pending()} publishes never confirmed")
    # Final quiescence while every user is still probed (kept active), then PostgreSQL.
    specs = [history(cfg.seed, i, run=run_tag) for i in range(count)]
    prober = asyncio.create_task(keep_probing(ctx, specs))
    quiet, dead = await asyncio.to_thread(system.quiesce)
    await asyncio.sleep(1.0)
    end = time.monotonic()
    final = await system.final_state(run_tag)
    ctx.finish.set()
    await prober
    report.unchecked = sorted(ctx.indeterminate)
    if ctx.unsettled:
        report.notes.append(
            f"{len(ctx.unsettled)} histories stopped probing after {SETTLE_MAX_S:.0f} s with an"
            " operation not yet due (the nemesis kept striking); their answers are all checked"
        )
    report.notes.append(
        f"histories played {played - began:.0f} s (incl. their probes until due),"
        f" quiescence and final read {end - played:.0f} s"
    )
    report.notes.append(
        f"publisher retries {publisher.retries}; admin answers {dict(ctx.admin_answers)}"
    )
    return end, final, dead, quiet
