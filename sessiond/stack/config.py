"""Where the local stack lives and which ports it uses; what it hands to processes and tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

USER = "sessiond"
PASSWORD = "sessiond"  # noqa: S105 - local stack on 127.0.0.1 only
VHOSTS = ("sessiond", "sessiond_test")
DATABASES = ("sessiond", "sessiond_test")


def env_port(name: str, default: int) -> int:
    """``SESSIOND_STACK_<NAME>_PORT``, so that several stacks (and clusters) share one host."""
    return int(os.environ.get(f"SESSIOND_STACK_{name}_PORT", default))


@dataclass(frozen=True, slots=True)
class StackConfig:
    """Paths and ports; every port can be moved by ``SESSIOND_STACK_<NAME>_PORT``."""

    root: Path
    amqp_port: int = 5672
    amqps_port: int = 5671
    mgmt_port: int = 15672
    dist_port: int = 25672
    redis_port: int = 6379
    pg_port: int = 5432
    # Where the CA and certificates live when not under ``root`` (a cluster's nodes share one).
    tls_root: Path | None = None

    @classmethod
    def from_env(cls) -> StackConfig:
        root = Path(os.environ.get("SESSIOND_STACK_DIR", ".stack")).resolve()
        return cls(
            root=root,
            amqp_port=env_port("AMQP", 5672),
            amqps_port=env_port("AMQPS", 5671),
            mgmt_port=env_port("MGMT", 15672),
            dist_port=env_port("DIST", 25672),
            redis_port=env_port("REDIS", 6379),
            pg_port=env_port("PG", 5432),
        )

    @property
    def tls_dir(self) -> Path:
        return self.tls_root if self.tls_root is not None else self.root / "tls"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.pem"

    def home(self, server: str) -> Path:
        """The directory holding ``server``'s data directory and log: the stack directory, except
        for a PostgreSQL placed where the ``postgres`` user can reach it (recorded in
        ``postgres.location``; see ``sessiond.stack.postgres``)."""
        record = self.root / f"{server}.location"
        if server == "postgres" and record.exists():
            return Path(record.read_text().strip())
        return self.root

    def dir(self, server: str) -> Path:
        return self.home(server) / server

    def pidfile(self, server: str) -> Path:
        return self.root / f"{server}.pid"

    def logfile(self, server: str) -> Path:
        return self.home(server) / f"{server}.log"

    @property
    def rabbit_node(self) -> str:
        """Two stacks on one host need two Erlang node names: the default AMQP port keeps
        ``sessiond@localhost``, any other port names the node after itself."""
        if self.amqp_port == 5672:
            return "sessiond@localhost"
        return f"sessiond{self.amqp_port}@localhost"

    def env_dict(self, *, test: bool = False) -> dict[str, str]:
        """The connection settings (CONTRACT §4) that reach this stack; TLS for AMQP.

        Every URL names 127.0.0.1, not ``localhost``: clients that resolve ``localhost`` try
        ``::1`` first, where nothing listens, and log a refused connection at error level on
        every start. The broker's certificate carries ``IP:127.0.0.1``, so TLS still verifies.
        """
        vhost = VHOSTS[1] if test else VHOSTS[0]
        db = DATABASES[1] if test else DATABASES[0]
        return {
            "SESSIOND_AMQP_URL": f"amqps://{USER}:{PASSWORD}@127.0.0.1:{self.amqps_port}/{vhost}",
            "SESSIOND_AMQP_CA_FILE": str(self.ca_file),
            "SESSIOND_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/{15 if test else 0}",
            "SESSIOND_DATABASE_URL": f"postgres://{USER}:{PASSWORD}@127.0.0.1:{self.pg_port}/{db}",
        }

    def env_lines(self, *, test: bool = False) -> list[str]:
        return [f"export {k}={v}" for k, v in self.env_dict(test=test).items()]
