"""The release phase of the arm64 field trial (benchmarks/field_arm64.py), after its last
round: every tier's final model released to the agents in the emulated root as
``takfl-coordinator release`` does it (:func:`coordinator.deploy.command.release`: export
on this host, signed release, stages of half and all of each tier's devices, over the
trial's Mosquitto with the release service's own login ``takfl-release``), then a few
batch-1 predictions asked of every agent's local endpoint from this host (the chroot shares
the host's network namespace: the agents' loopback is the host's).

Per agent: install time, the health check's batch-1 p50/p99 and peak RSS as the device
reported them, and the release's bytes, all from the release records
(``RUN/releases/rollouts.json``), and the endpoint's own p50/p99 after the predictions
(``GET /v1/metrics``); per tier: the rollout (state, bytes, its whole time). Every figure is
qemu emulation on this x86 machine, not board speed.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from benchmarks.arm64_board import BOARD_HOME, log
from coordinator.demo import predict
from coordinator.deploy.command import release, release_settings
from coordinator.deploy.rollout import INSTALL, Rollout
from coordinator.deploy.service import RELEASE_USER
from coordinator.deploy.store import ReleaseStore
from coordinator.deploy.summary import release_summary
from coordinator.registry import REGISTRY_FILE
from coordinator.testbed import loopback_url
from takfl.config import FederationConfig
from takfl.federation_data import build_federation_data
from takfl.release.keys import ROOT_FILE
from takfl.release.reference import percentiles_ms

EMULATION = "qemu emulation on this x86 machine, not board speed"
STAGES = (0.5, 1.0)
ABORT_ABOVE = 0.2
DEVICE_TIMEOUT_S = 900.0  # an emulated install (load, health check) is slow
RELEASE_TIMEOUT_S = 5400.0  # the whole release command, the export on this host included
PREDICTIONS = 16  # batch-1 requests to each agent's endpoint


def release_args(agent_id: str, port: int) -> tuple[str, ...]:
    """``takfl-agent run`` options inside the root: install the fleet's releases (trusting
    the ``root.json`` staged in ``~/trial``) and serve the active one on loopback ``port``."""
    return (
        *("--release-root", f"{BOARD_HOME}/trial/{ROOT_FILE}"),
        *("--state-dir", f"{BOARD_HOME}/trial/releases/{agent_id}"),
        *("--serve", f"127.0.0.1:{port}"),
    )


def release_to_boards(run_dir: Path, fleet: Path, broker_port: int) -> list[Rollout]:
    """Every tier's final model released to its agents, with the release login that
    ``provision`` wrote to ``fleet/release.password``; the rollout records."""
    settings = release_settings(
        broker=loopback_url(broker_port, RELEASE_USER),
        password_file=fleet / "release.password",
        agents_file=fleet / REGISTRY_FILE,
        stages=STAGES,
        abort_above=ABORT_ABOVE,
        device_timeout_s=DEVICE_TIMEOUT_S,
        timeout_s=RELEASE_TIMEOUT_S,
    )
    return release(run_dir, None, settings, report=log)


def endpoint_metrics(port: int, timeout_s: float = 30.0) -> dict[str, Any]:
    """``GET /v1/metrics`` of the endpoint on loopback ``port``."""
    url = f"http://127.0.0.1:{port}/v1/metrics"
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def ask_endpoint(port: int, x: torch.Tensor, y: list[int]) -> dict[str, Any]:
    """One batch-1 prediction per test sample of ``x`` (normalised, labels ``y``) from the
    endpoint on loopback ``port``, then its metrics: :func:`served_figures` of them."""
    classes: list[int | None] = []
    seconds: list[float] = []
    errors: list[str] = []
    for i in range(len(y)):
        start = time.perf_counter()
        try:
            answer = predict(port, x[i : i + 1], timeout_s=60.0)
        except (OSError, ValueError) as e:
            errors.append(str(e))
            classes.append(None)
            continue
        seconds.append(time.perf_counter() - start)
        classes.append(int(answer["classes"][0]))
    try:
        metrics = endpoint_metrics(port)
    except (OSError, ValueError) as e:
        errors.append(f"metrics: {e}")
        metrics = {}
    return served_figures(classes, y, seconds, metrics, errors)


def served_figures(
    classes: list[int | None],
    labels: list[int],
    seconds: list[float],
    metrics: Mapping[str, Any],
    errors: list[str],
) -> dict[str, Any]:
    """What an endpoint served: predictions asked and right, the round trip seen from the
    host (p50/p99 ms of ``seconds``), and the endpoint's own counters and p50/p99 from its
    ``metrics`` (``GET /v1/metrics``)."""
    roundtrip = percentiles_ms(seconds) if seconds else (None, None)
    return {
        "predictions": len(labels),
        "correct": sum(int(c == y) for c, y in zip(classes, labels, strict=True)),
        "roundtrip_p50_ms": _round(roundtrip[0], 1),
        "roundtrip_p99_ms": _round(roundtrip[1], 1),
        "served_version": metrics.get("active_version"),
        "endpoint_requests": metrics.get("requests"),
        "endpoint_errors": metrics.get("errors"),
        "endpoint_p50_ms": _round(metrics.get("latency_p50_ms"), 2),
        "endpoint_p99_ms": _round(metrics.get("latency_p99_ms"), 2),
        "errors": errors,
    }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def device_figures(
    rollouts: Iterable[Rollout], served: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Per agent offered an install release (rollback releases left out), sorted by agent:
    the outcome, install time, the health check's batch-1 p50/p99 and peak RSS as the
    device reported them, and the release's bytes, from the rollout records; then what its
    endpoint ``served`` (:func:`served_figures`, by agent id; absent: nothing asked)."""
    rows = []
    for r in rollouts:
        if r.action != INSTALL:
            continue
        for d in r.devices.values():
            rows.append(
                {
                    "agent": d.agent,
                    "prototype": r.prototype,
                    "version": r.version,
                    "outcome": d.outcome or d.state.value,
                    "reason": d.reason or None,
                    "runtime": d.runtime or None,
                    "release_bytes": r.artifact_bytes,
                    "install_s": _round(d.install_s, 1),
                    "health_p50_ms": _round(d.latency_p50_ms, 2),
                    "health_p99_ms": _round(d.latency_p99_ms, 2),
                    "peak_rss_mb": _round(d.peak_rss_mb, 1),
                    **served.get(d.agent, {}),
                }
            )
    return sorted(rows, key=lambda row: (row["agent"], row["version"]))


TIER_FIELDS = ("prototype", "version", "state", "devices", "installed", "failed", "bytes")


def tier_figures(rollout_rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per tier's rollout (``release_summary``'s rows), sorted by tier and version: state,
    devices, installed, failures by reason, bytes, median install time and the whole
    rollout's time (first offer to its end), in seconds."""
    rows = [
        {
            **{k: row[k] for k in TIER_FIELDS},
            "install_s": _round(row["install_s"], 1),
            "rollout_s": _round(row["rollout_s"], 1),
        }
        for row in rollout_rows
    ]
    return sorted(rows, key=lambda row: (row["prototype"], row["version"]))


def release_phase(
    run_dir: Path, fleet: Path, broker_port: int, ports: Mapping[str, int], cfg: FederationConfig
) -> dict[str, Any]:
    """Release to the boards, ask every agent's endpoint (``ports``: agent id -> port), and
    read the figures of the rollouts this release made back from the release records: the
    trial's ``release`` record."""
    start = time.monotonic()
    made = {r.id for r in release_to_boards(run_dir, fleet, broker_port)}
    wall_s = time.monotonic() - start
    log(f"released in {wall_s:.0f} s; asking every agent's endpoint for {PREDICTIONS} predictions")
    data = build_federation_data(cfg, 0)  # the seed the coordinator serves with by default
    x, y = data.test_x[:PREDICTIONS], data.test_y[:PREDICTIONS].tolist()
    served = {agent: ask_endpoint(port, x, y) for agent, port in ports.items()}
    return {
        "label": EMULATION,
        "stages": list(STAGES),
        "abort_above": ABORT_ABOVE,
        "wall_s": round(wall_s, 1),
        "tiers": tier_figures(
            row for row in release_summary(run_dir)["rollouts"] if row["rollout"] in made
        ),
        "agents": device_figures(
            (r for r in ReleaseStore(run_dir).load_rollouts() if r.id in made), served
        ),
    }


def print_release(rel: dict[str, Any]) -> None:
    stages = "/".join(f"{s:.0%}" for s in rel["stages"])
    print(
        f"\nrelease to the arm64 agents ({EMULATION}): stages {stages}, "
        f"{rel['wall_s']} s with the export on this host"
    )
    print(
        f"{'tier':4} {'version':>7} {'state':10} {'installed':>9} {'bytes':>9} "
        f"{'install s':>9} {'rollout s':>9}  failed"
    )
    for tier in rel["tiers"]:
        print(
            f"{tier['prototype']:4} {tier['version']:>7} {tier['state']:10} "
            f"{tier['installed']:>4}/{tier['devices']:<4} {tier['bytes']:>9} "
            f"{tier['install_s']!s:>9} {tier['rollout_s']!s:>9}  {tier['failed'] or '-'}"
        )
    print(
        f"{'agent':6} {'runtime':14} {'outcome':9} {'install s':>9} {'health p50/p99 ms':>18} "
        f"{'served p50/p99 ms':>18} {'peak RSS MB':>11} {'right':>6}"
    )
    for a in rel["agents"]:
        health = f"{a['health_p50_ms']}/{a['health_p99_ms']}"
        served = f"{a.get('endpoint_p50_ms')}/{a.get('endpoint_p99_ms')}"
        right = f"{a.get('correct', '-')}/{a.get('predictions', '-')}"
        print(
            f"{a['agent']:6} {a['runtime']!s:14} {a['outcome']:9} {a['install_s']!s:>9} "
            f"{health:>18} {served:>18} {a['peak_rss_mb']!s:>11} {right:>6}"
        )
