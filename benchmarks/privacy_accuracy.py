"""Accuracy under central DP: the simulate runs of TAKFL (takfl-reg) and FedDF at each
epsilon, gathered into one table and one JSON file.

    python benchmarks/privacy_accuracy.py RUNS_DIR [--json benchmarks/results/privacy_accuracy.json]

RUNS_DIR holds one ``simulate`` output folder per (data set, rounds, epsilon, seed), named
``<dataset>-r<rounds>-eps<epsilon|none>-s<seed>`` (docs/results/privacy.md gives the
loop that makes them). Final-round test accuracy per tier, mean and population std over
the seeds found (the seeds column says which), the mean over tiers taken per seed; the
epsilon actually spent (the largest over tiers, from metrics.jsonl) and each tier's
noise multiplier.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from takfl.run_layout import METRICS_FILE, RESULTS_FILE

NAME = re.compile(r"^(?P<ds>[a-z0-9]+)-r(?P<rounds>\d+)-eps(?P<eps>[0-9.]+|none)-s(?P<seed>\d+)$")


def gather(root: Path) -> dict[str, Any]:
    """(dataset, rounds) -> algorithm -> epsilon -> per-seed finals and privacy facts."""
    out: dict[str, Any] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for folder in sorted(root.iterdir()):
        m = NAME.match(folder.name)
        if not m or not (folder / RESULTS_FILE).is_file():
            continue
        key = f"{m['ds']}, {m['rounds']} rounds"
        seed = int(m["seed"])
        results = json.loads((folder / RESULTS_FILE).read_text())["results"]
        last: dict[tuple[str, str], dict[str, Any]] = {}
        for line in (folder / METRICS_FILE).read_text().splitlines():
            rec = json.loads(line)
            last[(rec["algorithm"], rec["prototype"])] = rec
        for alg, by_proto in results.items():
            finals = {p: v["per_seed"][0] for p, v in by_proto.items()}
            private = [last[(alg, p)].get("privacy") for p in finals if (alg, p) in last]
            out[key][alg][m["eps"]][seed] = {
                "final": finals,
                "epsilon_spent": max((p["epsilon"] for p in private if p), default=None),
                "noise_multiplier": {
                    p: last[(alg, p)]["privacy"]["noise_multiplier"]
                    for p in finals
                    if last.get((alg, p), {}).get("privacy")
                },
            }
    return out


def summarise(runs: dict[str, Any]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for key, algs in runs.items():
        for alg, by_eps in algs.items():
            for eps, seeds in by_eps.items():
                protos = list(next(iter(seeds.values()))["final"])
                cells = {p: [s["final"][p] for s in seeds.values()] for p in protos}
                means = [float(np.mean([s["final"][p] for p in protos])) for s in seeds.values()]
                table.setdefault(key, {}).setdefault(alg, {})[eps] = {
                    "seeds": sorted(seeds),
                    "tiers": {p: [float(np.mean(v)), float(np.std(v))] for p, v in cells.items()},
                    "mean_over_tiers": [float(np.mean(means)), float(np.std(means))],
                    "epsilon_spent": max(
                        (s["epsilon_spent"] for s in seeds.values() if s["epsilon_spent"]),
                        default=None,
                    ),
                    "noise_multiplier": next(iter(seeds.values()))["noise_multiplier"],
                }
    return table


def markdown(table: dict[str, Any]) -> str:
    order = ["none", "8", "3", "1"]
    lines = []
    for key, algs in table.items():
        lines += [f"**{key}**", ""]
        protos = list(next(iter(next(iter(algs.values())).values()))["tiers"])
        head = [
            "algorithm",
            "epsilon",
            *protos,
            "mean over tiers",
            "epsilon spent",
            "z per tier",
            "seeds",
        ]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for alg, by_eps in algs.items():
            for eps in sorted(by_eps, key=lambda e: order.index(e) if e in order else 9):
                r = by_eps[eps]
                tiers = [f"{m:.1f} ± {s:.1f}" for m, s in r["tiers"].values()]
                mean = "{:.2f} ± {:.2f}".format(*r["mean_over_tiers"])
                spent = "–" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.2f}"
                z = ", ".join(f"{p} {v:.2f}" for p, v in r["noise_multiplier"].items()) or "–"
                label = "no DP" if eps == "none" else eps
                seeds = ",".join(str(s) for s in r["seeds"])
                lines.append(
                    f"| {alg} | {label} | " + " | ".join([*tiers, mean, spent, z, seeds]) + " |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/privacy_accuracy.json"))
    args = ap.parse_args()
    table = summarise(gather(args.runs))
    print(markdown(table))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"delta": 1e-5, "table": table}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
