"""Merge per-seed ``simulate`` runs into the README's comparison tables and JSON.

    python benchmarks/comparison.py NAME=RUN[,RUN...] [NAME=RUN,...] ... \
        [--metric test|val] [--json benchmarks/results/comparison.json]

Each ``NAME=RUN,RUN`` is one table (e.g. ``sensors-validation=runs/s0,runs/s1,runs/s2``):
the final round of every seed, per algorithm and tier, mean ± std over seeds (population
std, as ``simulate``), and the mean over tiers (computed per seed, then mean ± std).
It prints a Markdown table per group and whether ``takfl-reg`` (the paper's form) meets
the goal against the baselines: mean over tiers ≥ every baseline's, every tier ≥
FedDF's, the largest tier ≥ FedAvg's largest − 1 point.

``--metric val`` reads each final global model's accuracy on the labelled validation
set (``info.global_val_accuracy``) instead of the test set: settings are chosen on it.
With ``--json`` the tables are written there under their names (merged into the file;
each entry records its metric).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.compare import read_metrics, scale_counts

BASELINES = ("feddf", "fedet", "fedavg")
PAPER_FORM = "takfl-reg"


def final_by_seed(
    records: list[dict[str, Any]], metric: str
) -> dict[str, dict[str, dict[int, float]]]:
    """algorithm -> tier -> seed -> final-round accuracy (%)."""
    last = max((r["round"] for r in records), default=0)
    out: dict[str, dict[str, dict[int, float]]] = {}
    for r in records:
        if r["round"] != last:
            continue
        if metric == "test":
            v = r["test_accuracy"]
        else:
            v = (r.get("info") or {}).get("global_val_accuracy")
            if v is None:
                raise ValueError(f"{r['algorithm']} seed {r['seed']}: no global_val_accuracy")
        out.setdefault(r["algorithm"], {}).setdefault(r["prototype"], {})[int(r["seed"])] = float(v)
    return out


def summarise(by_seed: dict[str, dict[str, dict[int, float]]]) -> dict[str, Any]:
    """Per algorithm: tiers {mean, std, per_seed, seeds} and the mean over tiers."""
    out: dict[str, Any] = {}
    for alg, tiers in by_seed.items():
        seeds = sorted(set.intersection(*(set(s) for s in tiers.values())))
        row: dict[str, Any] = {}
        for tier, vals in tiers.items():
            v = [vals[s] for s in seeds]
            row[tier] = {
                "mean": float(np.mean(v)),
                "std": float(np.std(v)),
                "per_seed": v,
                "seeds": seeds,
            }
        per_seed_mean = [float(np.mean([tiers[t][s] for t in tiers])) for s in seeds]
        row["mean_over_tiers"] = {
            "mean": float(np.mean(per_seed_mean)),
            "std": float(np.std(per_seed_mean)),
            "per_seed": per_seed_mean,
            "seeds": seeds,
        }
        out[alg] = row
    return out


def goal(summary: dict[str, Any], tiers: list[str]) -> list[str]:
    """The goal's three checks for the paper's form, on the means over seeds."""
    if PAPER_FORM not in summary:
        return []
    t = summary[PAPER_FORM]
    lines = []
    for b in BASELINES:
        if b in summary:
            ok = t["mean_over_tiers"]["mean"] >= summary[b]["mean_over_tiers"]["mean"]
            lines.append(
                f"mean over tiers {t['mean_over_tiers']['mean']:.2f} vs {b} "
                f"{summary[b]['mean_over_tiers']['mean']:.2f}: {'met' if ok else 'NOT met'}"
            )
    if "feddf" in summary:
        for tier in tiers:
            ok = t[tier]["mean"] >= summary["feddf"][tier]["mean"]
            lines.append(
                f"tier {tier} {t[tier]['mean']:.1f} vs feddf {summary['feddf'][tier]['mean']:.1f}: "
                f"{'met' if ok else 'NOT met'}"
            )
    if "fedavg" in summary:
        big = tiers[-1]
        ok = t[big]["mean"] >= summary["fedavg"][big]["mean"] - 1.0
        lines.append(
            f"largest tier {big} {t[big]['mean']:.1f} vs fedavg "
            f"{summary['fedavg'][big]['mean']:.1f} - 1: "
            f"{'met' if ok else 'NOT met'}"
        )
    return lines


def markdown(summary: dict[str, Any], tiers: list[str]) -> str:
    def cell(c: dict[str, Any], digits: int) -> str:
        return (
            f"{c['mean']:.{digits}f} ± {c['std']:.{digits}f}"
            if len(c["seeds"]) > 1
            else f"{c['mean']:.{digits}f}"
        )

    head = f"| algorithm | {' | '.join(tiers)} | mean over tiers | seeds |"
    rows = [head, "|" + "---|" * (len(tiers) + 3)]
    for alg, row in summary.items():
        seeds = ",".join(str(s) for s in row["mean_over_tiers"]["seeds"])
        cells = " | ".join(cell(row[t], 1) for t in tiers)
        rows.append(f"| {alg} | {cells} | {cell(row['mean_over_tiers'], 2)} | {seeds} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", nargs="+", help="NAME=RUN[,RUN...]")
    ap.add_argument("--metric", choices=("test", "val"), default="test")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    written: dict[str, Any] = {}
    for group in args.groups:
        name, _, runs = group.partition("=")
        records = read_metrics([Path(r) for r in runs.split(",") if r])
        tiers = list(dict.fromkeys(r["prototype"] for r in records))
        summary = summarise(final_by_seed(records, args.metric))
        print(f"\n### {name} ({args.metric} accuracy %, final round)\n")
        print(markdown(summary, tiers))
        for line in goal(summary, tiers):
            print(f"- {line}")
        counts = scale_counts(records)
        if counts:
            print(f"- takfl-scaled: scale chosen {counts} (student-rounds)")
        written[name] = {"metric": args.metric, "summary": summary, "scale_counts": counts}
    if args.json is not None:
        old = json.loads(args.json.read_text()) if args.json.is_file() else {}
        old.update(written)
        args.json.write_text(json.dumps(old, indent=1))
        print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
