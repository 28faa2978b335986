"""The nemesis on the local cluster: one server of a kind crashed or frozen at a time, found the
way ``sessiond.stack``'s cluster modules find it (their pid files, the role each server reports).

- ``kill_worker``: as on the single-node stack.
- ``kill_rabbitmq``: SIGKILL one RabbitMQ node (its Erlang VM), restart it after a while.
- ``pause_redis``: SIGSTOP a Redis master, SIGCONT it later. A pause longer than the cluster's
  node timeout (2 s) gets its replica promoted: the master wakes up as a stale one and turns
  into a replica.
- ``kill_redis``: SIGKILL a Redis master; once its replica took over, restart it (it rejoins as a
  replica: restarted earlier, the empty node would be copied by its replica, docs/cluster.md).
- ``failover_postgres``: SIGKILL the primary's postmaster, promote the standby a few seconds
  later (as a failover manager would), rebuild the old primary as the new standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal

from sessiond.stack import postgres_cluster, rabbitmq, rabbitmq_cluster, redis_cluster
from sessiond.stack.cluster_config import RABBIT_NODES, REDIS_NODES, ClusterConfig
from sessiond.stack.proc import wait
from tests.model.client import Recorder
from tests.model.generator import CLUSTER_FAULT_KINDS
from tests.model.nemesis import Nemesis, Service

log = logging.getLogger(__name__)

MASTERS = REDIS_NODES // 2
TAKEOVER_TIMEOUT_S = 60.0


class ClusterNemesis(Nemesis):
    def __init__(
        self,
        cluster_cfg: ClusterConfig,
        worker: Service,
        recorder: Recorder,
        *,
        seed: int,
        kinds: tuple[str, ...] = CLUSTER_FAULT_KINDS,
    ) -> None:
        super().__init__(
            rabbitmq_cluster.nodes(cluster_cfg)[0], worker, recorder, seed=seed, kinds=kinds
        )
        self.cluster = cluster_cfg
        self.victims = random.Random(f"{seed}/cluster-nemesis")  # which node of the kind
        self._killed_redis: int | None = None

    async def _inject(self, kind: str, seconds: float) -> None:
        if kind == "kill_worker":
            await super()._inject(kind, seconds)
        elif kind == "kill_rabbitmq":
            n = self.victims.randint(1, RABBIT_NODES)
            await asyncio.to_thread(rabbitmq_cluster.kill, self.cluster, n)
            log.warning("nemesis victim", extra={"node": rabbitmq_cluster.name(n)})
            await asyncio.sleep(seconds)
        elif kind in ("pause_redis", "kill_redis"):
            port = self.victims.choice(redis_cluster.masters(self.cluster))
            pid = redis_cluster.node_pid(self.cluster, port)
            assert pid is not None
            log.warning("nemesis victim", extra={"node": redis_cluster.name(port)})
            if kind == "pause_redis":
                self._paused = pid
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(seconds)
            else:
                self._killed_redis = port
                os.kill(pid, signal.SIGKILL)
        elif kind == "failover_postgres":
            await asyncio.to_thread(postgres_cluster.kill_primary, self.cluster)
            await asyncio.sleep(seconds)
            await asyncio.to_thread(postgres_cluster.promote, self.cluster)
        else:
            raise ValueError(f"unknown cluster fault {kind!r}")

    def _taken_over(self) -> bool:
        """Every slot served by a live master again (the killed or paused one replaced, or back)."""
        return len(redis_cluster.masters(self.cluster)) == MASTERS

    def _heal(self) -> None:
        """Everything back: Redis resumed, each cluster whole (a killed Redis master only once its
        replica took over; a killed PostgreSQL primary rebuilt as the standby), a worker. A
        cluster left whole is not touched: its ``up`` costs seconds of ``rabbitmqctl``."""
        if self._paused is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._paused, signal.SIGCONT)
            self._paused = None
        cfg = self.cluster
        logf = redis_cluster.logfile(cfg, cfg.redis_port)
        if self._killed_redis is not None:
            wait(self._taken_over, "redis-cluster failover", TAKEOVER_TIMEOUT_S, logf)
            self._killed_redis = None
        if not all(redis_cluster.running(cfg, port) for port in cfg.redis_ports()):
            redis_cluster.up(cfg)
        wait(self._taken_over, "redis-cluster roles", TAKEOVER_TIMEOUT_S, logf)
        redis_cluster.wait_ok(cfg, timeout=TAKEOVER_TIMEOUT_S)
        roles = [s["role"] for s in postgres_cluster.status(cfg).values()]
        if "primary" not in roles:
            postgres_cluster.promote(cfg)
        if set(roles) != {"primary", "standby"}:  # a server down (role None) or not streaming
            postgres_cluster.up(cfg)
        if not all(rabbitmq.running(node) for node in rabbitmq_cluster.nodes(cfg)):
            rabbitmq_cluster.up(cfg)
        if not self.worker.alive():
            self.worker.start()
