"""The PostgreSQL pair after a failover, as the next user of the cluster meets it.

Once the standby is promoted and ``stack up --cluster`` rebuilt the old primary as the new
standby, the multi-host URL lists that standby first. A database created on the primary is
flushed on the standby at commit, not yet replayed, and asyncpg does not try the next host on
"database does not exist": the model checker's cluster run once failed on it in CI, connecting
straight after ``cluster.namespace_env``. Now ``namespace_env`` returns only once every standby
has the database; the test holds the standby's replay back to make the race certain.
"""

from __future__ import annotations

import threading
import time

import asyncpg
import pytest

from sessiond.stack import cluster, postgres, postgres_cluster
from sessiond.stack.cluster_config import ClusterConfig

pytestmark = [pytest.mark.cluster, pytest.mark.integration, pytest.mark.slow]


async def test_a_fresh_database_is_reachable_at_once_after_a_failover(
    local_cluster: ClusterConfig,
) -> None:
    # Given a failover: the primary SIGKILLed, the standby promoted, the pair rebuilt
    cluster.up(local_cluster)
    postgres_cluster.kill_primary(local_cluster)
    time.sleep(1)
    promoted = postgres_cluster.promote(local_cluster)
    cluster.up(local_cluster)
    standby = next(
        local_cluster.postgres(p)
        for p in postgres_cluster.PLACES
        if postgres_cluster.role(local_cluster.postgres(p)) == "standby"
    )
    assert standby.pg_port != promoted.pg_port
    # And the standby's replay held back for 2 s, as a loaded machine holds it back
    postgres.psql(standby, "SELECT pg_wal_replay_pause()")
    resume = threading.Timer(2.0, postgres.psql, (standby, "SELECT pg_wal_replay_resume()"))
    resume.start()
    name = f"fresh_{int(time.time())}"
    try:
        # When a fresh database is asked for and reached straight away
        env = cluster.namespace_env(local_cluster, name)
        # Then the standby has it already, and the multi-host URL connects to the primary
        exists = f"SELECT 1 FROM pg_database WHERE datname='{name}'"
        assert postgres.psql(standby, exists) == "1"
        conn = await asyncpg.connect(env["SESSIOND_DATABASE_URL"], timeout=10)
        try:
            assert await conn.fetchval("SELECT inet_server_port()") == promoted.pg_port
        finally:
            await conn.close()
    finally:
        resume.join()
        postgres.psql(promoted, f'DROP DATABASE IF EXISTS "{name}"')
