"""Redis for the local stack: one daemonized ``redis-server`` on 127.0.0.1, no persistence."""

from __future__ import annotations

from sessiond.stack.config import StackConfig
from sessiond.stack.proc import kill_pidfile, port_open, read_pid, run, wait


def start(cfg: StackConfig) -> None:
    if running(cfg):
        return
    data = cfg.dir("redis")
    data.mkdir(parents=True, exist_ok=True)
    logf = cfg.logfile("redis")
    run(
        ["redis-server", "--port", str(cfg.redis_port), "--bind", "127.0.0.1",
         "--dir", str(data), "--save", "", "--appendonly", "no",
         # sessiond keeps state in Redis, not only a cache: never evict (storage.redis_policy)
         "--maxmemory", "1gb", "--maxmemory-policy", "noeviction",
         "--daemonize", "yes",
         "--pidfile", str(cfg.pidfile("redis")), "--logfile", str(logf)],
        server="redis",
        logfile=logf,
    )  # fmt: skip
    wait(lambda: port_open(cfg.redis_port), "redis", 20, logf)


def stop(cfg: StackConfig) -> None:
    kill_pidfile(cfg.pidfile("redis"))


def running(cfg: StackConfig) -> bool:
    return read_pid(cfg.pidfile("redis")) is not None and port_open(cfg.redis_port)
