"""Merge the metrics of several simulation runs (e.g. seeds run as separate processes)
into one comparison: final-round accuracy per algorithm and tier (mean ± std over
seeds), and a plot of each TAKFL student's lambdas per round."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from takfl.run_layout import METRICS_FILE

Record = dict[str, Any]


def read_metrics(run_dirs: list[Path]) -> list[Record]:
    """Every record of every run's metrics file; a (algorithm, seed) pair present in two
    runs is refused, so a seed is never counted twice."""
    records: list[Record] = []
    owner: dict[tuple[str, int], Path] = {}
    for d in run_dirs:
        path = d / METRICS_FILE
        if not path.is_file():
            raise ValueError(f"{d} holds no {METRICS_FILE}; is it a simulate output folder?")
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            key = (rec["algorithm"], int(rec["seed"]))
            if owner.setdefault(key, d) != d:
                raise ValueError(f"{key[0]} seed {key[1]} appears in both {owner[key]} and {d}")
            records.append(rec)
    return records


def final_accuracy(records: list[Record]) -> dict[str, dict[str, dict[str, Any]]]:
    """algorithm -> tier -> {mean, std, per_seed} at each seed's last round (complete
    seeds only: a seed whose run stopped early is left out and listed in ``incomplete``)."""
    last_round = max((r["round"] for r in records), default=0)
    by: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r["round"] == last_round:
            by[r["algorithm"]][r["prototype"]][int(r["seed"])] = float(r["test_accuracy"])
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for alg, tiers in by.items():
        out[alg] = {}
        for tier, seeds in tiers.items():
            vals = [seeds[s] for s in sorted(seeds)]
            out[alg][tier] = {
                "mean": float(np.mean(vals)),
                "std": float(np.std(vals)),
                "per_seed": vals,
                "seeds": sorted(seeds),
            }
    return out


def lambdas_per_round(records: list[Record], algorithm: str) -> dict[str, dict[str, list[float]]]:
    """student -> teacher -> mean lambda (over seeds) per round, for ``algorithm``."""
    acc: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in records:
        if r["algorithm"] == algorithm and r.get("lambdas"):
            for teacher, lam in r["lambdas"].items():
                acc[r["prototype"]][teacher][int(r["round"])].append(float(lam))
    return {
        s: {t: [float(np.mean(v[k])) for k in sorted(v)] for t, v in teachers.items()}
        for s, teachers in acc.items()
    }


def plot_lambdas(lams: dict[str, dict[str, list[float]]], path: Path, title: str) -> None:
    """One panel per student, one line per teacher: lambda against round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = list(lams)
    fig, axes = plt.subplots(1, len(students), figsize=(4.2 * len(students), 3.4), squeeze=False)
    for ax, student in zip(axes[0], students, strict=True):
        for teacher, ys in lams[student].items():
            ax.plot(np.arange(1, len(ys) + 1), ys, marker="o", ms=3, label=f"teacher {teacher}")
        ax.set_title(f"student {student}")
        ax.set_xlabel("round")
        ax.set_ylabel("lambda (mean over seeds)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scale_counts(records: list[Record], algorithm: str = "takfl-scaled") -> dict[str, int]:
    """How often each task-vector scale was chosen (the takfl-scaled ablation)."""
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        if r["algorithm"] == algorithm and "scale" in (r.get("info") or {}):
            counts[f"{r['info']['scale']:g}"] += 1
    return dict(sorted(counts.items()))
