"""The soak's figures: one PNG per measure, time on the x axis, the outages shaded, and a text
table of the run for docs/soak.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

# measure -> (title, y label, sample keys to draw)
FIGURES: dict[str, tuple[str, str, list[str]]] = {
    "requests": ("/auth/check requests per second", "req/s", ["req_s", "req_200", "req_401"]),
    "latency": ("/auth/check latency", "ms", ["p50_ms", "p99_ms"]),
    "redis_memory": ("Redis used_memory", "MiB", ["redis_mib"]),
    "backlog": ("Access-log backlog in Redis (audit:access)", "entries", ["backlog"]),
    "audit_rows": ("audit_events rows written (id sequence)", "rows", ["audit_rows"]),
}


def _shade(ax: Any, events: list[dict[str, Any]]) -> None:
    for ev in events:
        ax.axvspan(ev["start"], ev["end"], alpha=0.15, color=ev.get("color", "red"))
        ax.text(ev["start"], 1.0, " " + ev["name"], transform=ax.get_xaxis_transform(),
                va="top", fontsize=8)  # fmt: skip


def _series(samples: list[dict[str, Any]], key: str) -> tuple[list[float], list[float | None]]:
    return [s["t"] for s in samples], [s.get(key) for s in samples]


def plot(samples: list[dict[str, Any]], events: list[dict[str, Any]], out: Path) -> list[Path]:
    """Writes one PNG per measure into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, (title, ylabel, keys) in FIGURES.items():
        fig, ax = plt.subplots(figsize=(9, 3.6))
        for key in keys:
            xs, ys = _series(samples, key)
            ax.plot(xs, [float("nan") if y is None else y for y in ys], label=key, linewidth=1)
        _finish(fig, ax, title, ylabel, events, out / f"{name}.png", len(keys) > 1)
        paths.append(out / f"{name}.png")
    fig, ax = plt.subplots(figsize=(9, 3.6))
    names = sorted({n for s in samples for n in s.get("rss", {})})
    for proc in names:
        ax.plot(
            [s["t"] for s in samples],
            [s.get("rss", {}).get(proc, float("nan")) for s in samples],
            label=proc,
            linewidth=1,
        )
    _finish(fig, ax, "RSS of each sessiond process", "MiB", events, out / "rss.png", True)
    paths.append(out / "rss.png")
    return paths


def _finish(
    fig: Any,
    ax: Any,
    title: str,
    ylabel: str,
    events: list[dict[str, Any]],
    path: Path,
    legend: bool,
) -> None:
    _shade(ax, events)
    ax.set_title(title)
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _stat(samples: list[dict[str, Any]], key: str, fn: Any) -> Any:
    values = [s[key] for s in samples if s.get(key) is not None]
    return fn(values) if values else None


def table(samples: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """A Markdown table of the run: steady state, during each outage, after."""
    rows = [
        ("max /auth/check rate measured (closed loop)", f"{summary['max_rate']:.0f} req/s"),
        ("target rate (open loop)", f"{summary['target_rate']:.0f} req/s"),
        ("mean rate achieved", f"{_stat(samples, 'req_s', lambda v: sum(v) / len(v)):.0f} req/s"),
        (
            "p50 / p99, median of the seconds",
            f"{_stat(samples, 'p50_ms', _median)} / {_stat(samples, 'p99_ms', _median)} ms",
        ),
        ("worst second's p99", f"{_stat(samples, 'p99_ms', max)} ms"),
        ("peak Redis used_memory", f"{_stat(samples, 'redis_mib', max)} MiB"),
        ("peak backlog", f"{_stat(samples, 'backlog', max)} entries"),
        (
            "events published / applied",
            f"{summary['events_published']} / {summary['events_applied']}",
        ),
    ]
    for proc, peak in sorted(summary["rss_peak"].items()):
        first = summary["rss_first"].get(proc)
        last = summary["rss_last"].get(proc)
        rows.append((f"RSS {proc}: first / peak / last", f"{first} / {peak} / {last} MiB"))
    for key, value in summary["check"].items():
        rows.append((f"check: {key}", str(value)))
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
