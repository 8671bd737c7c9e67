"""What ``status`` and the field-trial report show of releases: each rollout's state per
tier, and the on-device latency the devices measured, per hardware class.

Pure reading and arithmetic over the rollout records (``RUN/releases/rollouts.json``):
no printing, no writing.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from coordinator.deploy.records import DeviceState
from coordinator.deploy.rollout import Rollout
from coordinator.deploy.store import ReleaseStore
from coordinator.store import RunStore
from takfl.config import ConfigError, FederationConfig, load_federation, prototype_profile

OFFERED = frozenset(DeviceState) - {DeviceState.PENDING}


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def rollout_rows(rollouts: Iterable[Rollout]) -> list[dict[str, Any]]:
    """One row per rollout, newest first: tier, version, action, state, stage, devices
    offered / installed / failed by reason / rolled back, download size, install time
    (median over devices), the whole rollout's time (first offer to its end)."""
    rows = []
    for r in sorted(rollouts, key=lambda r: (r.created_at, r.version), reverse=True):
        devices = list(r.devices.values())
        outcomes = Counter(d.outcome for d in devices if d.outcome)
        failed = Counter(d.reason or "?" for d in devices if d.outcome in ("failed", "timed_out"))
        states = Counter(d.state for d in devices)
        rows.append(
            {
                "rollout": r.id,
                "prototype": r.prototype,
                "version": r.version,
                "action": r.action if r.action == "install" else f"rollback to {r.reinstates}",
                "state": r.state.value,
                "stage": f"{r.stage + 1}/{len(r.stages)}",
                "devices": len(devices),
                "offered": sum(d.state in OFFERED for d in devices),
                "installed": outcomes.get("installed", 0),
                "failed": dict(sorted(failed.items())),
                "rolled_back": states.get(DeviceState.ROLLED_BACK, 0),
                "rollback_failed": states.get(DeviceState.ROLLBACK_FAILED, 0),
                "rollback_version": r.rollback_version,
                "halt_reason": r.halt_reason,
                "bytes": r.artifact_bytes,
                "install_s": _median(d.install_s for d in devices),
                "rollout_s": None
                if r.started_at is None or r.finished_at is None
                else r.finished_at - r.started_at,
            }
        )
    return rows


def latency_rows(rollouts: Iterable[Rollout], classes: Mapping[str, str]) -> list[dict[str, Any]]:
    """Health-check latency at batch 1 as the devices measured it, per hardware class,
    tier, release and runtime: devices, median p50 and p99, worst p99, peak RSS."""
    groups: dict[tuple[str, str, int, str], list[Any]] = {}
    for r in rollouts:
        for d in r.devices.values():
            if d.latency_p50_ms is None:
                continue
            key = (classes.get(r.prototype, "?"), r.prototype, r.version, d.runtime or "?")
            groups.setdefault(key, []).append(d)
    rows = []
    for (hardware, proto, version, runtime), devices in sorted(groups.items()):
        p99s = [d.latency_p99_ms for d in devices if d.latency_p99_ms is not None]
        rss = [d.peak_rss_mb for d in devices if d.peak_rss_mb is not None]
        rows.append(
            {
                "hardware_class": hardware,
                "prototype": proto,
                "version": version,
                "runtime": runtime,
                "devices": len(devices),
                "p50_ms": _median(d.latency_p50_ms for d in devices),
                "p99_ms": _median(p99s),
                "worst_p99_ms": max(p99s) if p99s else None,
                "peak_rss_mb": max(rss) if rss else None,
                "install_s": _median(d.install_s for d in devices),
            }
        )
    return rows


def hardware_classes(cfg: FederationConfig) -> dict[str, str]:
    """prototype -> the hardware class of its device profile."""
    return {p.name: prototype_profile(cfg, p.name).hardware_class for p in cfg.prototypes}


def release_summary(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``{"rollouts": rollout_rows, "latency": latency_rows}`` of a run directory (both
    empty when nothing was released)."""
    run = Path(run_dir)
    rollouts = ReleaseStore(run).load_rollouts()
    if not rollouts:
        return {"rollouts": [], "latency": []}
    try:
        classes = hardware_classes(load_federation(RunStore(run).config_path))
    except (ConfigError, OSError):
        classes = {}
    return {"rollouts": rollout_rows(rollouts), "latency": latency_rows(rollouts, classes)}
