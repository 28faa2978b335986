"""CI smoke version of the load run (``python -m loadtests.run``): a few Locust users for a few
seconds against real API, worker and scheduler processes on the local stack, then the final
state check. Also proves that the check fails loudly when the state differs from the ledger."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtests import check
from loadtests.harness import ROOT
from sessiond.config import Settings
from storage import redis_conn

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_locust_smoke_run_matches_the_published_state(
    migrated: Settings, test_env: dict[str, str], tmp_path: Path
) -> None:
    # Given the test namespace (vhost, database, Redis db of this suite)
    # When the load run drives 5 Locust users for 12 seconds through the whole system
    proc = subprocess.run(
        [
            sys.executable, "-m", "loadtests.run", "--use-env",
            "-u", "5", "-r", "5", "-t", "12s", "--processes", "1", "--threads", "4",
            "--results", str(tmp_path), "--prefix", "smoke", "--max-p95-ms", "2000",
        ],
        env={**os.environ, **test_env}, cwd=ROOT, capture_output=True, text=True, timeout=100,
        check=False,
    )  # fmt: skip
    summary = json.loads((tmp_path / "smoke_summary.json").read_text())

    # Then every gate holds and PostgreSQL/Redis hold exactly what the publishers sent
    assert proc.returncode == 0, (summary.get("problems"), proc.stderr[-3000:])
    assert summary["gates"]["failures"] == 0
    assert summary["published"]["confirmed"] > 0
    chk = summary["check"]
    assert chk["ok"] and chk["users"] > 0 and chk["processed_events"] >= chk["confirmed_events"]
    assert chk["journal_rows"] >= chk["journal_expected"] > 0
    p95 = summary["gates"]["p95_ms"]
    assert "JOURNEY disconnected → refused" in p95  # the journey ran and measured revocation
    assert any(k.startswith("AMQP publish") for k in p95)
    for name in ("smoke_stats.csv", "smoke_failures.csv", "smoke.html", "smoke_ledger.json"):
        assert (tmp_path / name).stat().st_size > 0, name

    # When one connected user's cache entry disappears behind the system's back
    ledger = json.loads((tmp_path / "smoke_ledger.json").read_text())
    victim = next(uid for uid, u in ledger["users"].items() if u["sessions"] and not u["uncertain"])
    redis_conn.connect_sync(migrated).delete(f"user:{victim}")
    # Then the check reports exactly that
    report = asyncio.run(check.check(migrated, ledger, drain_timeout=10, journal=False))
    assert not report.ok
    assert report.mismatches == {"redis_missing": [victim]}


def test_compare_reports_every_kind_of_difference() -> None:
    # Given what the publishers sent for four users
    expected: dict[str, dict[str, Any]] = {
        "a": {"sessions": ["web"], "uncertain": False},
        "b": {"sessions": [], "uncertain": False},
        "c": {"sessions": ["web", "mobile"], "uncertain": False},
        "d": {"sessions": ["web"], "uncertain": True},
    }
    # When the database and the cache disagree in every possible way
    rows = {"a": "connected", "b": "connected", "c": "connected", "x": "disconnected"}
    open_sessions = {"a": {"web"}, "b": {"web"}, "c": {"web"}}
    cached: dict[str, dict[str, Any] | None] = {
        "a": {"status": "connected", "sessions": ["web"]},
        "b": {"status": "connected", "sessions": ["web"]},
        "c": {"status": "connected", "sessions": ["web"]},
    }
    report = check.Report()
    check.compare(expected, rows, open_sessions, cached, report)
    # Then each difference is named, the uncertain user is skipped and "a" is fine
    assert report.mismatches == {
        "extra_user": ["x"],
        "status": ["b: connected, expected disconnected"],
        "sessions": [
            "b: ['web'], expected []",
            "c: ['web'], expected ['mobile', 'web']",
        ],
        "redis_extra": ["b: connected ['web']"],
        "redis_stale": ["c: connected ['web']"],
    }
    assert report.uncertain == 1 and report.connected == 2
