"""The release tables ``status``, ``release`` and ``rollback`` print (rich), from
:func:`coordinator.deploy.summary.release_summary`. Text that devices reported (failure
reasons) is escaped, never read as markup."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from coordinator.deploy.summary import release_summary

_RIGHT = (
    "version",
    "stage",
    "offered",
    "installed",
    "rolled back",
    "KiB",
    "install s",
    "rollout s",
)
_LATENCY_RIGHT = ("version", "devices", "p50 ms", "p99 ms", "worst p99 ms")


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def rollout_table(rows: list[dict[str, Any]]) -> Table:
    """Each release's state per tier: offered, installed, failed by reason, rolled back."""
    table = Table(title="releases (newest first)")
    headers = ("tier", "version", "action", "state", "stage", "offered", "installed")
    for col in (*headers, "failed (reason)", "rolled back", "KiB", "install s", "rollout s"):
        table.add_column(col, justify="right" if col in _RIGHT else "left")
    for r in rows:
        back = str(r["rolled_back"])
        if r["rollback_failed"]:
            back += f" ({r['rollback_failed']} failed)"
        table.add_row(
            r["prototype"],
            str(r["version"]),
            r["action"],
            r["state"],
            r["stage"],
            f"{r['offered']}/{r['devices']}",
            str(r["installed"]),
            escape(", ".join(f"{k} {n}" for k, n in r["failed"].items()) or "0"),
            back,
            f"{r['bytes'] / 1024:.0f}",
            _num(r["install_s"], 1),
            _num(r["rollout_s"], 1),
        )
    return table


def latency_table(rows: list[dict[str, Any]]) -> Table:
    """On-device latency at batch 1 per hardware class, as the health checks measured it."""
    table = Table(title="on-device inference latency at batch 1 (health check)")
    for col in ("hardware", "tier", "version", "runtime", "devices", *_LATENCY_RIGHT[2:]):
        table.add_column(col, justify="right" if col in _LATENCY_RIGHT else "left")
    for r in rows:
        table.add_row(
            r["hardware_class"],
            r["prototype"],
            str(r["version"]),
            escape(r["runtime"]),
            str(r["devices"]),
            _num(r["p50_ms"]),
            _num(r["p99_ms"]),
            _num(r["worst_p99_ms"]),
        )
    return table


def release_tables(run_dir: str | Path) -> list[Table | Text]:
    """What to print about a run's releases ([] when nothing was released)."""
    summary = release_summary(run_dir)
    if not summary["rollouts"]:
        return []
    out: list[Table | Text] = [rollout_table(summary["rollouts"])]
    rows = summary["rollouts"]
    out += [Text(f"  {r['rollout']}: {r['halt_reason']}") for r in rows if r["halt_reason"]]
    if summary["latency"]:
        out.append(latency_table(summary["latency"]))
    return out
