"""The table: each figure beside its limit."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

TARGETS = {
    "auth_check_ratio": 0.7,
    "revocation_median_ms": 100.0,
    "events_ratio": 0.5,
    # 1,000 users, each token naming one session, 2 flushes: one update per user and one per
    # session per flush (the per-session idle timeout's ``sessions.last_seen_at``).
    "row_updates": 4000,
}


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("ok" if ok else "MISSED")


def table(out: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = [["#", "measure", "sessiond", "reference / limit", "ratio", "target"]]
    s1 = out.get("1")
    if s1:
        ac, bare = s1["auth_check"], s1["bare"]
        target = TARGETS["auth_check_ratio"]
        rows.append([
            "1", f"/auth/check cache hit, req/s (best of {len(s1['rounds']['bare'])})",
            f"{ac['rps']:,}", f"bare Sanic {bare['rps']:,}", f"{s1['ratio']:.2f}",
            f">= {target} {verdict(s1['ratio'] >= target)}",
        ])  # fmt: skip
        rows.append([
            "1", "  p50 / p99 ms", f"{ac['p50_ms']} / {ac['p99_ms']}",
            f"{bare['p50_ms']} / {bare['p99_ms']}", "", "",
        ])  # fmt: skip
        rows.append([
            "1", "  wrk CPU (one core = 100 %)", f"{ac['wrk_cpu_pct']} %",
            f"{bare['wrk_cpu_pct']} %", "", "",
        ])  # fmt: skip
        rows.append([
            "1", "  server CPU (2 cores = 200 %)",
            f"{ac.get('server_cpu_pct')} % + Redis {ac.get('redis_cpu_pct')} %",
            f"{bare.get('server_cpu_pct')} %", "", "",
        ])  # fmt: skip
        rv = s1["revocation_ms"]
        rows.append([
            "1", f"revocation delay ms (median of {rv['trials']})", f"{rv['median']}",
            f"p90 {rv['p90']}, max {rv['max']}", "",
            f"<= {TARGETS['revocation_median_ms']:.0f} "
            f"{verdict(rv['median'] <= TARGETS['revocation_median_ms'])}",
        ])  # fmt: skip
    s2 = out.get("2")
    if s2:
        rows.append([
            "2", f"events applied/s ({s2['events']:,} events, {s2['users']:,} users)",
            f"{s2['events_per_s']:,}", f"raw pika {s2['raw']['msgs_per_s']:,}",
            f"{s2['ratio']:.3f}",
            f">= {TARGETS['events_ratio']} {verdict(s2['ratio'] >= TARGETS['events_ratio'])}",
        ])  # fmt: skip
    s3 = out.get("3")
    if s3:
        rows.append([
            "3", f"PG row updates, {s3['granted_journaled']:,} granted req, {s3['users']:,} users,"
            " 2 flushes", f"{s3['row_updates']:,}",
            f"(+{s3['row_inserts']:,} audit inserts)", "",
            f"<= {TARGETS['row_updates']:,} {verdict(s3['row_updates'] <= TARGETS['row_updates'])}",
        ])  # fmt: skip
    s4 = out.get("4")
    if s4:
        rows.append([
            "4", f"expiry sweep, {s4['users']:,} connected / {s4['stale']:,} stale",
            f"{s4['sweep']['seconds']} s", f"{s4['sweep']['users_per_s']:,} users/s",
            "", "report",
        ])  # fmt: skip
        rows.append([
            "4", "  steady sweep (nothing to expire) / flush of 100k activity",
            f"{s4['sweep_nothing_to_expire_s']} s", f"{s4['flush']['seconds']} s", "", "",
        ])  # fmt: skip
    s5 = out.get("5")
    if s5:
        rm = s5["redis"]
        rows.append([
            "5", f"Redis memory per {rm['users']:,} cached users",
            f"{rm['memory_usage_mib']} MiB", f"used_memory delta {rm['used_memory_delta_mib']} MiB",
            "", "report",
        ])  # fmt: skip
        rows.append(
            ["5", "RSS one API worker", f"{s5['rss_api_worker_mib']} MiB", "", "", "report"]
        )
        rows.append([
            "5", "RSS one worker process", f"{s5['rss_worker_process_mib']} MiB", "", "", "report",
        ])  # fmt: skip
    return rows


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
