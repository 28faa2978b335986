"""CI's run of the model checker (issue 11): a short fixed-seed run, then a random seed (printed,
so that a failure can be replayed with ``python -m tests.model --seed S``). Each is the real
thing: API, workers and scheduler as processes, the nemesis on this stack's servers, every answer
checked; the assertion is the checker's verdict."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from sessiond import stack
from tests.conftest import ROOT

pytestmark = [pytest.mark.model, pytest.mark.integration, pytest.mark.slow]

# Its nemesis starts with Redis paused 16 s (longer than the reconciler's old 10 s look-back,
# issue 11 scenario 2); a RabbitMQ restart, the slowest fault here, is left to random seeds.
FIXED_SEED = 20261263
MINUTES = 0.15  # new histories start for 9 s; with set-up, tails and the final check, ~1 min


def run_checker(
    seed: int, *, minutes: float = MINUTES, extra: tuple[str, ...] = (), timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "tests.model", "--minutes", str(minutes), "--seed", str(seed)]
    return subprocess.run(
        [*argv, *extra], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def verdict(result: subprocess.CompletedProcess[str]) -> str:
    report = result.stdout.strip()
    return f"exit {result.returncode}\n{report[-12000:]}\n{result.stderr.strip()[-3000:]}"


@pytest.mark.timeout(300)
def test_fixed_seed_run_has_no_violation(stack_config: stack.StackConfig) -> None:
    result = run_checker(FIXED_SEED)
    print(result.stdout)
    assert "requests checked:" in result.stdout, verdict(result)
    assert result.returncode == 0, verdict(result)


@pytest.mark.timeout(300)
def test_random_seed_run_has_no_violation(stack_config: stack.StackConfig) -> None:
    seed = random.SystemRandom().randrange(1, 10**6)
    print(f"model checker: random seed {seed}")
    result = run_checker(seed)
    print(result.stdout)
    assert "requests checked:" in result.stdout, verdict(result)
    assert result.returncode == 0, f"seed {seed}: " + verdict(result)
