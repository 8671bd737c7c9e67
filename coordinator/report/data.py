"""Everything the report shows, gathered from a run directory into one JSON-able dict.

Sources (all optional but ``metrics.jsonl``): ``state.json``, ``metrics.jsonl``
(accuracy and lambdas per round; several algorithms when the run compared baselines),
``telemetry.jsonl`` (``coordinator.telemetry_log``), ``exports/report.json`` and the
release records (``coordinator.deploy.summary``).
Pure reading and arithmetic: no plotting, no writing.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.deploy.summary import release_summary
from coordinator.observe import LATE_REASONS
from coordinator.store import RunStore
from takfl.run_layout import METRICS_FILE, export_report_path


class ReportError(ValueError):
    """The directory is not a run the report can be made of."""


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def accuracy_curves(metrics: list[dict[str, Any]]) -> dict[str, dict[str, list[list[float]]]]:
    """algorithm -> prototype -> [[round, mean accuracy %, std over seeds], ...]."""
    acc: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for m in metrics:
        acc[m.get("algorithm", "?")][m["prototype"]][int(m["round"])].append(
            float(m["test_accuracy"])
        )
    return {
        alg: {
            p: [[r, *_mean_std(v)] for r, v in sorted(by_round.items())]
            for p, by_round in protos.items()
        }
        for alg, protos in acc.items()
    }


def privacy_rows(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round and prototype of a private run (seed 0 or the lowest, the first algorithm):
    epsilon spent so far at delta, the noise multiplier and the clipping bound used."""
    private = [m for m in metrics if m.get("privacy")]
    if not private:
        return []
    alg = private[0].get("algorithm", "?")
    seed = min(int(m.get("seed", 0)) for m in private if m.get("algorithm", "?") == alg)
    return [
        {
            "round": int(m["round"]),
            "prototype": m["prototype"],
            "epsilon": float(m["privacy"]["epsilon"]),
            "delta": float(m["privacy"]["delta"]),
            "noise_multiplier": float(m["privacy"]["noise_multiplier"]),
            "clip_norm": float(m["privacy"]["clip_norm"]),
        }
        for m in private
        if m.get("algorithm", "?") == alg and int(m.get("seed", 0)) == seed
    ]


def lambda_grids(metrics: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """algorithm -> student -> {rounds, teachers, values[teacher][round]} (seed 0 or the
    lowest seed; a round without coefficients is left out)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    seeds: dict[str, int] = {}
    for m in metrics:
        alg = m.get("algorithm", "?")
        seeds[alg] = min(seeds.get(alg, m.get("seed", 0)), m.get("seed", 0))
    for m in metrics:
        lam = m.get("lambdas")
        alg = m.get("algorithm", "?")
        if not lam or m.get("seed", 0) != seeds[alg]:
            continue
        grid = out.setdefault(alg, {}).setdefault(
            m["prototype"], {"rounds": [], "teachers": list(lam), "values": {}}
        )
        grid["rounds"].append(int(m["round"]))
        for t, v in lam.items():
            grid["values"].setdefault(t, {})[int(m["round"])] = float(v)
    for protos in out.values():
        for grid in protos.values():
            rounds = sorted(set(grid["rounds"]))
            grid["rounds"] = rounds
            grid["values"] = [
                [grid["values"].get(t, {}).get(r, 0.0) for r in rounds] for t in grid["teachers"]
            ]
    return out


def device_stats(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """prototype -> lists of train_s, peak_rss_mb, samples_per_s over every update,
    and the profile's memory limit (largest seen)."""
    out: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("kind") != "update" or not e.get("telemetry"):
            continue
        t = e["telemetry"]
        d = out.setdefault(
            e["prototype"],
            {"train_s": [], "peak_rss_mb": [], "samples_per_s": [], "rss_limit_mb": None},
        )
        for key in ("train_s", "peak_rss_mb", "samples_per_s"):
            if t.get(key) is not None:
                d[key].append(float(t[key]))
        if t.get("rss_limit_mb") is not None:
            d["rss_limit_mb"] = max(d["rss_limit_mb"] or 0.0, float(t["rss_limit_mb"]))
    return out


def agent_table(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per agent: platform, updates, refusals, mean train time, peak memory,
    traffic, retries and the smallest deadline slack; ``implausible``: the values it
    reported that no device of its tier can have measured (``field=value``, flagged by
    the telemetry log and never counted as measurements)."""
    rows: dict[str, dict[str, Any]] = {}

    def row(agent: str, proto: str | None) -> dict[str, Any]:
        return rows.setdefault(
            agent,
            {
                "agent_id": agent,
                "prototype": proto,
                "platform": "",
                "runtimes": "",
                "updates": 0,
                "refused": 0,
                "train_s": [],
                "peak_rss_mb": None,
                "rss_limit_mb": None,
                "bytes_sent": 0,
                "bytes_received": 0,
                "retries": 0,
                "min_slack_s": None,
                "implausible": [],
            },
        )

    for e in events:
        kind, agent = e.get("kind"), e.get("agent_id")
        if agent is None or kind not in ("register", "update", "refusal"):
            continue
        r = row(agent, e.get("prototype"))
        r["prototype"] = r["prototype"] or e.get("prototype")
        if kind == "refusal":
            r["refused"] += 1
            continue
        if kind == "update":
            r["updates"] += 1
        for name, value in sorted((e.get("implausible") or {}).items()):
            flag = f"{name}={value:g}"
            if flag not in r["implausible"]:
                r["implausible"].append(flag)
        t = e.get("telemetry") or {}
        p = t.get("platform") or {}
        if p:
            r["platform"] = (
                f"{p.get('machine', '')} {p.get('system', '')}, Python {p.get('python', '')}, "
                f"torch {p.get('torch', '')}"
                + (f", {p['accelerator']}" if p.get("accelerator") else "")
            )
            r["runtimes"] = ", ".join(f"{k} {v}" for k, v in sorted(p.get("runtimes", {}).items()))
        if t.get("train_s") is not None:
            r["train_s"].append(float(t["train_s"]))
        for key in ("peak_rss_mb", "rss_limit_mb"):
            if t.get(key) is not None:
                r[key] = max(r[key] or 0.0, float(t[key]))
        for key in ("bytes_sent", "bytes_received", "retries"):
            r[key] = max(r[key], int(t.get(key, 0)))  # counters since the agent started
        if t.get("deadline_slack_s") is not None:
            s = float(t["deadline_slack_s"])
            r["min_slack_s"] = s if r["min_slack_s"] is None else min(r["min_slack_s"], s)
    out = []
    for r in rows.values():
        times = r.pop("train_s")
        r["mean_train_s"] = float(np.mean(times)) if times else None
        out.append(r)
    return out


def straggler_timeline(
    events: list[dict[str, Any]], metrics: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per round: sampled, answered, late, missing (counts over all tiers) and refused
    updates by reason. From the telemetry log's round records; a run without one falls
    back to metrics.jsonl (sampled and answered only)."""
    refusals: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    late: dict[int, set[str]] = defaultdict(set)
    for e in events:
        if e.get("kind") == "refusal" and e.get("round") is not None:
            refusals[int(e["round"])][e["reason"]] += 1
            if e["reason"] in LATE_REASONS:
                late[int(e["round"])].add(e["agent_id"])
    rounds = [e for e in events if e.get("kind") == "round"]
    out = []
    if rounds:
        for e in sorted(rounds, key=lambda e: e["round"]):
            r = int(e["round"])
            sampled = {a for ids in e["sampled"].values() for a in ids}
            answered = {a for ids in e["answered"].values() for a in ids}
            late_r = (late[r] | {a for ids in e.get("late", {}).values() for a in ids}) - answered
            out.append(
                {
                    "round": r,
                    "sampled": len(sampled),
                    "answered": len(answered),
                    "late": len(late_r & sampled),
                    "missing": len(sampled - answered - late_r),
                    # the round record counts every refusal until the round closed; the
                    # log (capped per agent) also holds those of late arrivals after it
                    "refused": {
                        k: max(int(e.get("refused", {}).get(k, 0)), refusals[r].get(k, 0))
                        for k in {*e.get("refused", {}), *refusals[r]}
                    },
                    "duration_s": e.get("duration_s"),
                }
            )
        return out
    first_seed: dict[tuple[int, str], dict[str, Any]] = {}
    for m in metrics:
        first_seed.setdefault((int(m["round"]), m["prototype"]), m)
    per_round: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for (r, _p), m in first_seed.items():
        per_round[r][0] += int(m.get("sampled", 0))
        per_round[r][1] += int(m.get("clients", 0))
    for r, (s, a) in sorted(per_round.items()):
        out.append(
            {
                "round": r,
                "sampled": s,
                "answered": a,
                "late": 0,
                "missing": s - a,
                "refused": dict(refusals[r]),
                "duration_s": None,
            }
        )
    return out


def traffic(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round and tier: bytes of global models sent with tasks and of accepted updates."""
    out = []
    for e in sorted((e for e in events if e.get("kind") == "round"), key=lambda e: e["round"]):
        for p in sorted(e.get("bytes_down", {})):
            out.append(
                {
                    "round": int(e["round"]),
                    "prototype": p,
                    "down": int(e["bytes_down"][p]),
                    "up": int(e.get("bytes_up", {}).get(p, 0)),
                }
            )
    return out


EXPORT_FIELDS = (  # what the report keeps of each verified export, in its table's order
    "prototype",
    "format",
    "quantization",
    "runtime",
    "status",
    "size_mb",
    "accuracy",
    "agreement",
    "max_abs_diff",
    "p50_ms",
)


def export_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Rows of ``exports/report.json`` (format, quantisation, runtime, status, size, ...)."""
    path = export_report_path(run_dir)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return []
    return [
        {k: row.get(k) for k in EXPORT_FIELDS}
        for proto in data.get("prototypes", [])
        for row in proto.get("rows", [])
    ]


def committed_metrics(store: RunStore) -> list[dict[str, Any]]:
    """metrics.jsonl lines of committed rounds (every round of a simulate output), the
    last line per (algorithm, seed, round, prototype)."""
    state = store.state_if_any()
    done = state["round"] if state is not None else None
    latest: dict[tuple[str, int, int, str], dict[str, Any]] = {}
    for m in store.metrics_records():
        if "round" not in m or "prototype" not in m or "test_accuracy" not in m:
            continue
        if done is not None and int(m["round"]) > done:
            continue
        key = (str(m.get("algorithm", "?")), int(m.get("seed", 0)), int(m["round"]), m["prototype"])
        latest[key] = m
    return list(latest.values())


def build_report(run_dir: str | Path) -> dict[str, Any]:
    """The report's data (what ``report.json`` holds) for a run directory."""
    run = Path(run_dir)
    store = RunStore(run)
    try:
        metrics = committed_metrics(store)
        events = store.telemetry()
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"cannot read {run}: {e}") from e
    if not metrics:
        raise ReportError(
            f"{run} has no {METRICS_FILE} records; give the run directory of serve, demo or "
            "simulate after at least one round"
        )
    state: Mapping[str, Any] = store.state_if_any() or {}
    curves = accuracy_curves(metrics)
    prototypes = list(dict.fromkeys(m["prototype"] for m in metrics))  # the config's order
    main = state.get("algorithm") or next(iter(curves))
    return {
        "run": str(run),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "config": state.get("config") or "",
        "algorithm": main,
        "phase": state.get("phase"),
        "rounds": max(int(m["round"]) for m in metrics),
        "prototypes": prototypes,
        "accuracy": curves,
        "final": {
            alg: {p: pts[-1][1] for p, pts in protos.items()} for alg, protos in curves.items()
        },
        "lambdas": lambda_grids(metrics),
        "privacy": privacy_rows(metrics),
        "devices": device_stats(events),
        "agents": sorted(
            agent_table(events),
            key=lambda a: (
                prototypes.index(a["prototype"]) if a["prototype"] in prototypes else 99,
                a["agent_id"],
            ),
        ),
        "stragglers": straggler_timeline(events, metrics),
        "traffic": traffic(events),
        "exports": export_rows(run),
        "releases": release_summary(run),
    }
