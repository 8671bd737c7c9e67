"""Tables of update codecs against fp16: bytes per update and final accuracy per tier.

    python benchmarks/bandwidth.py RUNS_DIR [--baseline fp16] [--goal-ratio 0.03]
        [--goal-drop 0.5] [--json benchmarks/results/bandwidth.json]

``RUNS_DIR`` holds ``simulate`` runs named ``<config>-<label>-s<seed>`` (one seed each,
``--compression`` set), e.g. ``takfl-coordinator simulate --config digits --seeds 1
--first-seed 0 --compression topk-int8 --out RUNS_DIR/digits-topk-int8-s0``). Runs of one
config and label form a row: per tier, the encoded update's size as a fraction of the
same model's fp32 delta (mean over every update of every round and seed, and the largest
round mean), the final-round test accuracy (mean ± population std over seeds) and the
mean over tiers (per seed, then mean ± std). Each row is compared with the baseline row
of its config on the seeds both have: the goal is every tier's mean size at most
``--goal-ratio`` of fp32 and the mean over tiers at most ``--goal-drop`` points below.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.compare import read_metrics
from takfl.run_layout import RESULTS_FILE

RUN_NAME = re.compile(r"^(?P<config>[^-]+)-(?P<label>.+)-s(?P<seed>\d+)$")


def read_run(path: Path) -> dict[str, Any]:
    """One finished run: its codecs, final accuracy and update sizes per tier."""
    records = read_metrics([path])
    last = max(r["round"] for r in records)
    tiers = list(dict.fromkeys(r["prototype"] for r in records))
    ratios: dict[str, list[float]] = {t: [] for t in tiers}
    sizes: dict[str, list[float]] = {t: [] for t in tiers}
    down: dict[str, list[float]] = {t: [] for t in tiers}  # after round 1, x the full model
    fulls: dict[str, float] = dict.fromkeys(tiers, 0.0)  # full models sent after round 1
    for r in records:
        if r.get("upload_bytes"):
            ratios[r["prototype"]].append(r["upload_bytes"] / r["fp32_bytes"])
            sizes[r["prototype"]].append(r["upload_bytes"])
        if r["round"] > 1 and r.get("download_delta_bytes"):
            down[r["prototype"]].append(r["download_delta_bytes"] / r["fp32_bytes"])
        if r["round"] > 1 and r.get("download_full"):
            fulls[r["prototype"]] += r["download_full"]
    return {
        "codecs": json.loads((path / RESULTS_FILE).read_text()).get("codecs"),
        "final": {r["prototype"]: r["test_accuracy"] for r in records if r["round"] == last},
        "fp32_bytes": {r["prototype"]: r.get("fp32_bytes") for r in records},
        "ratios": ratios,
        "sizes": sizes,
        "down": down,
        "fulls": fulls,
    }


def collect(root: Path) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """config -> label -> seed -> run, for every finished run under ``root``."""
    out: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for path in sorted(root.iterdir()):
        m = RUN_NAME.match(path.name)
        if m is None or not (path / RESULTS_FILE).exists():
            continue
        out.setdefault(m["config"], {}).setdefault(m["label"], {})[int(m["seed"])] = read_run(path)
    return out


def stats(values: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "per_seed": values}


def row(runs: dict[int, dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """One label's figures over ``seeds``."""
    tiers = list(runs[seeds[0]]["final"])
    out: dict[str, Any] = {"seeds": seeds, "codecs": runs[seeds[0]]["codecs"], "tiers": {}}
    for t in tiers:
        ratios = [x for s in seeds for x in runs[s]["ratios"][t]]
        sizes = [x for s in seeds for x in runs[s]["sizes"][t]]
        down = [x for s in seeds for x in runs[s].get("down", {}).get(t, [])]
        out["tiers"][t] = {
            "accuracy": stats([runs[s]["final"][t] for s in seeds]),
            "fp32_bytes": runs[seeds[0]]["fp32_bytes"][t],
            "bytes": float(np.mean(sizes)) if sizes else None,
            "ratio": float(np.mean(ratios)) if ratios else None,
            "ratio_max_round": float(max(ratios)) if ratios else None,
            # a delta of the global after round 1 (mean per client), x the full fp32 model
            "down_ratio": float(np.mean(down)) if down else None,
            "down_full_sends": float(
                np.mean([runs[s].get("fulls", {}).get(t, 0.0) for s in seeds])
            ),
        }
    out["mean_over_tiers"] = stats([float(np.mean(list(runs[s]["final"].values()))) for s in seeds])
    return out


def compare(
    config: dict[str, dict[int, dict[str, Any]]],
    baseline: str,
    goal_ratio: float,
    goal_drop: float,
    goal_down: float = 0.1,
) -> dict[str, Any]:
    """Every label's row, with its difference to the baseline on shared seeds; a row with
    downstream deltas also meets ``goal_down`` (its largest tier's delta of the global,
    after round 1, x the full fp32 model)."""
    out: dict[str, Any] = {}
    base = config.get(baseline, {})
    for label, runs in config.items():
        seeds = sorted(runs)
        r = row(runs, seeds)
        shared = sorted(set(seeds) & set(base))
        if shared and label != baseline:
            mine = row(runs, shared)["mean_over_tiers"]["mean"]
            theirs = row(base, shared)["mean_over_tiers"]["mean"]
            worst = max((v["ratio"] or 0.0) for v in r["tiers"].values())
            downs = [v["down_ratio"] for v in r["tiers"].values() if v["down_ratio"] is not None]
            worst_down = max(downs) if downs else None
            r["vs_baseline"] = {
                "seeds": shared,
                "mean_over_tiers_diff": mine - theirs,
                "largest_tier_ratio": worst,
                "largest_tier_down_ratio": worst_down,
                "goal_met": worst <= goal_ratio
                and mine - theirs >= -goal_drop
                and (worst_down is None or worst_down <= goal_down),
            }
        out[label] = r
    return out


def markdown(name: str, table: dict[str, Any], baseline: str) -> str:
    labels = sorted(table, key=lambda lab: (lab != baseline, lab))
    tiers = list(table[labels[0]]["tiers"])
    head = (
        "| codec | "
        + " | ".join(f"{t} bytes (x fp32)" for t in tiers)
        + " | "
        + " | ".join(f"{t} acc" for t in tiers)
        + " | "
        + " | ".join(f"{t} global (x fp32)" for t in tiers)
        + f" | mean over tiers | vs {baseline} | seeds |"
    )
    lines = [f"**{name}**", "", head, "|" + "---|" * (3 + 3 * len(tiers))]
    for lab in labels:
        r = table[lab]
        cells = []
        for t in tiers:
            v = r["tiers"][t]
            cells.append("—" if v["bytes"] is None else f"{v['bytes']:,.0f} ({v['ratio']:.4f})")
        accs = [
            f"{r['tiers'][t]['accuracy']['mean']:.1f} ± {r['tiers'][t]['accuracy']['std']:.1f}"
            for t in tiers
        ]
        downs = [
            "full"
            if r["tiers"][t].get("down_ratio") is None
            else f"{r['tiers'][t]['down_ratio']:.4f}"
            for t in tiers
        ]
        mot = r["mean_over_tiers"]
        vs = r.get("vs_baseline")
        diff = "—" if vs is None else f"{vs['mean_over_tiers_diff']:+.2f}"
        seeds = ",".join(map(str, r["seeds"]))
        lines.append(
            f"| {lab} | {' | '.join(cells)} | {' | '.join(accs)} | {' | '.join(downs)} | "
            f"{mot['mean']:.2f} ± {mot['std']:.2f} | {diff} | {seeds} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--baseline", default="fp16")
    ap.add_argument("--goal-ratio", type=float, default=0.03)
    ap.add_argument("--goal-drop", type=float, default=0.5)
    ap.add_argument("--goal-down", type=float, default=0.1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tables = {
        config: compare(labels, args.baseline, args.goal_ratio, args.goal_drop, args.goal_down)
        for config, labels in collect(args.runs).items()
    }
    for config, table in tables.items():
        print(markdown(config, table, args.baseline) + "\n")
        for label, r in table.items():
            vs = r.get("vs_baseline")
            if vs is not None:
                verdict = "met" if vs["goal_met"] else "missed"
                worst, down = vs["largest_tier_ratio"], vs["largest_tier_down_ratio"]
                globals_ = "full globals" if down is None else f"globals {down:.4f} x fp32"
                print(
                    f"- {config} {label}: goal {verdict}: largest tier {worst:.4f}"
                    f" x fp32 up, {globals_} down, mean over tiers"
                    f" {vs['mean_over_tiers_diff']:+.2f} points against {args.baseline}"
                    f" (seeds {vs['seeds']})"
                )
        print()
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        merged = json.loads(args.json.read_text()) if args.json.exists() else {}
        merged["upstream"] = {
            "baseline": args.baseline,
            "goal": {"ratio": args.goal_ratio, "drop": args.goal_drop, "down": args.goal_down},
            "tables": tables,
        }
        args.json.write_text(json.dumps(merged, indent=2) + "\n")


if __name__ == "__main__":
    main()
