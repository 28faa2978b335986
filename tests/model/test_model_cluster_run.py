"""The model checker on the local cluster (issue 15): one fixed-seed run of
``python -m tests.model --cluster``, its nemesis crashing a RabbitMQ node, freezing and crashing
Redis masters, failing PostgreSQL over and killing the worker while every answer is checked; the
assertion is the checker's verdict."""

from __future__ import annotations

import pytest

from sessiond.stack.cluster_config import ClusterConfig
from tests.model.test_model_run import run_checker, verdict

pytestmark = [pytest.mark.model, pytest.mark.cluster, pytest.mark.integration, pytest.mark.slow]

FIXED_SEED = 20261502
MINUTES = 0.5  # new histories start for 30 s; with the faults' heals and the tails, ~90 s


@pytest.mark.timeout(420)
def test_fixed_seed_cluster_run_has_no_violation(local_cluster: ClusterConfig) -> None:
    result = run_checker(FIXED_SEED, minutes=MINUTES, cluster=True)
    print(result.stdout)
    assert "requests checked:" in result.stdout, verdict(result)
    assert "faults injected: 0 " not in result.stdout, verdict(result)
    assert result.returncode == 0, verdict(result)
