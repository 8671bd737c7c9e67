"""Distillation budget curves: TAKFL in the paper's form (takfl-reg), FedET and FedDF at
budgets in passes over the public set, with a fixed or an adaptive budget; summarised
into tables, plots and JSON (docs/results/budget.md).

    python benchmarks/budget.py run --case digits --mode fixed --passes 0.5,1,2,4,10 \
        --seeds 0,1,2
    python benchmarks/budget.py run --case digits --fedavg --seeds 0,1,2
    python benchmarks/budget.py summarise --json benchmarks/results/budget.json \
        --plots benchmarks/results
    python benchmarks/budget.py trace --case sensors --round 5 --passes 10 --seed 0

``run``: each point is one ``takfl-coordinator simulate --compare`` process (the
methods share its partition), one after another, ``--threads 1``, on a copy of the
bundled federation with the distillation budget set (``distill.passes`` and
``distill.adaptive``; every other setting the bundled file's), written to
``runs/budget/<case>/<mode>/p<passes>/s<seed>/`` with the config it ran. A point whose
``results.json`` exists is skipped, so an interrupted sweep resumes.

``summarise``: per case, mode, budget and method, the final round's test accuracy per
tier (mean ± std over seeds) and the mean over tiers, the final global models'
validation accuracy (what settings are chosen on), the server step's seconds per round
(distillation + merge), the estimated distillation GFLOP per round, the steps each
distillation used and TAKFL's lambdas.

``trace``: one round of a run (the federation trained to ``--round`` with takfl-reg at
``--passes``), then every candidate distillation traced for ``--passes`` with a score
every quarter pass: TAKFL's candidate theta_ij's agreement with its teacher i on the
public set and its validation accuracy; FedET's and FedDF's student's agreement with
their targets and validation accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from takfl.run_layout import CONFIG_FILE, METRICS_FILE, RESULTS_FILE

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "budget"
METHODS = ("takfl-reg", "fedet", "feddf")
CASES = ("digits", "sensors", "sensors16")


# -- run ---------------------------------------------------------------------------------
def point_config(case: str, passes: float | None, adaptive: bool, **distill: Any) -> dict:
    """The bundled federation ``case`` with its distillation budget set (JSON-able)."""
    from takfl.config import load_federation

    cfg = load_federation(case).model_dump(mode="json")
    d = cfg["algorithm"]["distill"]
    if passes is not None:
        d.update(passes=passes, steps=None, epochs=None)
    d.update(adaptive=adaptive, **distill)
    return cfg


def point_dir(case: str, mode: str, passes: float | None, seed: int) -> Path:
    tag = "default" if passes is None else f"p{passes:g}"
    return RUNS / case / mode / tag / f"s{seed}"


def run_point(
    case: str,
    mode: str,
    passes: float | None,
    seed: int,
    methods: list[str],
    rounds: int | None,
    *,
    tag: str | None = None,
    distill: dict[str, Any] | None = None,
) -> None:
    """One simulate process for one budget point and seed (skipped when done); ``tag``
    names the folder of a variant (default: the mode), ``distill`` its other settings."""
    out = point_dir(case, tag or mode, passes, seed)
    if (out / RESULTS_FILE).is_file():
        print(f"done already: {out}")
        return
    out.mkdir(parents=True, exist_ok=True)
    cfg = point_config(case, passes, adaptive=mode == "adaptive", **(distill or {}))
    config = out / CONFIG_FILE
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [
        sys.executable,
        "-m",
        "coordinator.cli",
        "simulate",
        "--config",
        str(config),
        "--compare",
        ",".join(methods),
        "--seeds",
        "1",
        "--first-seed",
        str(seed),
        "--threads",
        "1",
        "--validation",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    if rounds is not None:
        cmd += ["--rounds", str(rounds)]
    (out / "command.txt").write_text(" ".join(cmd[1:]) + "\n")
    print(" ".join(cmd[2:]), flush=True)
    with (out / "log.txt").open("w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def cmd_run(args: argparse.Namespace) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.fedavg:
        for s in seeds:
            run_point(args.case, "fedavg", None, s, ["fedavg"], args.rounds)
        return
    budgets: list[float | None] = (
        [float(p) for p in args.passes.split(",")] if args.passes else [None]
    )
    methods = args.methods.split(",")
    distill = {k: yaml.safe_load(v) for k, _, v in (kv.partition("=") for kv in args.set)}
    for p in budgets:
        for s in seeds:
            run_point(
                args.case, args.mode, p, s, methods, args.rounds, tag=args.tag, distill=distill
            )


# -- summarise ---------------------------------------------------------------------------
def read_run(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (path / METRICS_FILE).read_text().splitlines()]


def per_round_costs(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean per round: server-step seconds (distillation + merge), distillation GFLOP
    (all students), and mean steps per distillation."""
    rounds: dict[int, dict[str, Any]] = {}
    steps: list[float] = []
    for r in records:
        row = rounds.setdefault(r["round"], {"timings": r["timings"], "gflop": 0.0})
        info = r.get("info") or {}
        row["gflop"] += float(info.get("distill_gflop", 0.0))
        steps += [v for k, v in info.items() if k.startswith("distill_steps")]
    step_s = [
        x["timings"].get("distill_s", 0.0) + x["timings"].get("merge_s", 0.0)
        for x in rounds.values()
    ]
    return {
        "server_step_s": float(np.mean(step_s)),
        "distill_gflop": float(np.mean([x["gflop"] for x in rounds.values()])),
        "steps_per_distillation": float(np.mean(steps)) if steps else 0.0,
        "cap": float(max((r.get("info") or {}).get("distill_cap", 0.0) for r in records)),
    }


def final_lambdas(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    last = max(r["round"] for r in records)
    return {r["prototype"]: r["lambdas"] for r in records if r["round"] == last and r["lambdas"]}


def summarise_point(runs: list[Path]) -> dict[str, Any]:
    """algorithm -> accuracy per tier and mean over tiers (test and validation), costs."""
    by_alg: dict[str, dict[str, Any]] = {}
    for run in runs:
        records = read_run(run)
        last = max(r["round"] for r in records)
        for alg in dict.fromkeys(r["algorithm"] for r in records):
            mine = [r for r in records if r["algorithm"] == alg]
            final = [r for r in mine if r["round"] == last]
            row = by_alg.setdefault(
                alg, {"seeds": [], "test": {}, "val": {}, "costs": [], "lambdas": []}
            )
            row["seeds"].append(mine[0]["seed"])
            for r in final:
                row["test"].setdefault(r["prototype"], []).append(r["test_accuracy"])
                row["val"].setdefault(r["prototype"], []).append(r["info"]["global_val_accuracy"])
            row["costs"].append(per_round_costs(mine))
            row["lambdas"].append(final_lambdas(mine))
    return {alg: reduce_row(row) for alg, row in by_alg.items()}


def stats(values: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "per_seed": values}


def reduce_row(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": row["seeds"]}
    for metric in ("test", "val"):
        tiers = row[metric]
        out[metric] = {t: stats(v) for t, v in tiers.items()}
        per_seed = np.mean([tiers[t] for t in tiers], axis=0).tolist()
        out[metric]["mean_over_tiers"] = stats(per_seed)
    out["costs"] = {k: float(np.mean([c[k] for c in row["costs"]])) for k in row["costs"][0]}
    lams = [lam for lam in row["lambdas"] if lam]
    if lams:
        out["lambdas"] = {
            s: {t: float(np.mean([lam[s][t] for lam in lams])) for t in lams[0][s]} for s in lams[0]
        }
    return out


def collect(root: Path) -> dict[str, Any]:
    """case -> mode -> budget tag -> summary, from every complete run under ``root``."""
    out: dict[str, Any] = {}
    for case_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for mode_dir in sorted(p for p in case_dir.iterdir() if p.is_dir()):
            for point in sorted(p for p in mode_dir.iterdir() if p.is_dir()):
                runs = sorted(s for s in point.iterdir() if (s / RESULTS_FILE).is_file())
                if runs:
                    summary = summarise_point(runs)
                    out.setdefault(case_dir.name, {}).setdefault(mode_dir.name, {})[point.name] = (
                        summary
                    )
    return out


def cmd_summarise(args: argparse.Namespace) -> None:
    data = collect(Path(args.runs))
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=1))
        print(f"written: {args.json}")
    for case, modes in data.items():
        print(markdown_case(case, modes))
        for mode in ("fixed", "adaptive"):
            if mode in modes:
                print(equal_compute(case, modes[mode], mode))
        for mode, points in modes.items():
            for tag in sorted(points, key=budget_key):
                if "takfl-reg" in points[tag] and len(points[tag]) > 1:
                    misses = goal_misses(points[tag], modes)
                    verdict = "met" if not misses else "NOT met: " + "; ".join(misses)
                    print(f"- goal, {case} {mode} {tag}: {verdict}")
    print(settings_table(data, "p10"))
    if args.plots is not None:
        for case, modes in data.items():
            shown = {m: v for m, v in modes.items() if not args.plot_modes or m in args.plot_modes}
            plot_case(case, shown, args.plots / f"budget-{case}.png")


def settings_table(data: dict[str, Any], tag: str) -> str:
    """Validation accuracy (mean over tiers, mean over seeds) of every method under every
    rule and setting (mode folder) run at budget ``tag``, per case, and its mean over
    cases for takfl-reg and over every method and case: the settings apply to every
    method, so they are chosen on the latter. The test accuracy beside each is for
    reading only."""
    modes = sorted({m for c in data.values() for m, pts in c.items() if tag in pts})
    cases = [c for c in data if any(tag in data[c].get(m, {}) for m in modes)]
    head = " | ".join(f"{c} {a}" for c in cases for a in METHODS)
    lines = [
        f"\n### Validation (test) accuracy at {tag.lstrip('p')} passes, "
        "mean over tiers and seeds\n",
        f"| rule and setting | {head} | validation, takfl-reg | validation, every method |",
        "|---|" + "---|" * (len(cases) * len(METHODS) + 2),
    ]
    for m in modes:
        cells, own, every = [], [], []
        for c in cases:
            point = data[c].get(m, {}).get(tag, {})
            for a in METHODS:
                row = point.get(a)
                if row is None:
                    cells.append("–")
                    continue
                val = row["val"]["mean_over_tiers"]["mean"]
                cells.append(f"{val:.1f} ({row['test']['mean_over_tiers']['mean']:.1f})")
                every.append(val)
                if a == "takfl-reg":
                    own.append(val)
        mean = f"{np.mean(own):.2f}" if len(own) == len(cases) else "–"
        overall = f"{np.mean(every):.2f}" if len(every) == len(cases) * len(METHODS) else "–"
        lines.append(f"| {m} | {' | '.join(cells)} | {mean} | {overall} |")
    return "\n".join(lines)


def goal_misses(point: dict[str, Any], modes: dict[str, Any]) -> list[str]:
    """Where takfl-reg misses the goal at one point: the mean over tiers and every tier's
    mean >= FedET's and FedDF's, its largest tier >= FedAvg's largest - 1."""
    t = point["takfl-reg"]["test"]
    tiers = [k for k in t if k != "mean_over_tiers"]
    out = []
    for b in ("fedet", "feddf"):
        if b not in point:
            continue
        for tier in [*tiers, "mean_over_tiers"]:
            gap = t[tier]["mean"] - point[b]["test"][tier]["mean"]
            if gap < 0:
                out.append(f"{tier} {gap:+.1f} vs {b}")
    fedavg = modes.get("fedavg", {}).get("default", {}).get("fedavg")
    if fedavg is not None:
        big = tiers[-1]
        gap = t[big]["mean"] - (fedavg["test"][big]["mean"] - 1.0)
        if gap < 0:
            out.append(f"{big} {gap:+.1f} vs fedavg - 1")
    return out


def fmt(cell: dict[str, Any]) -> str:
    return f"{cell['mean']:.1f} ± {cell['std']:.1f}"


def markdown_case(case: str, modes: dict[str, Any]) -> str:
    """One table per mode: rows budget x method."""
    fedavg = modes.get("fedavg", {}).get("default", {}).get("fedavg")
    lines = []
    for mode, points in modes.items():
        if mode == "fedavg":
            continue
        tiers = [
            t
            for t in next(iter(next(iter(points.values())).values()))["test"]
            if t != "mean_over_tiers"
        ]
        lines += [
            f"\n### {case}, {mode} budget (test accuracy %, final round, mean ± std over seeds)\n",
            f"| passes | method | {' | '.join(tiers)} | mean over tiers | val mean | "
            "steps/distillation | GFLOP/round | step s/round |",
            "|" + "---|" * (len(tiers) + 7),
        ]
        for tag in sorted(points, key=budget_key):
            for alg, row in points[tag].items():
                c = row["costs"]
                cells = " | ".join(fmt(row["test"][t]) for t in tiers)
                mean, val = row["test"]["mean_over_tiers"], row["val"]["mean_over_tiers"]
                lines.append(
                    f"| {tag.lstrip('p')} | {alg} | {cells} | {fmt(mean)} | {val['mean']:.1f} | "
                    f"{c['steps_per_distillation']:.1f} / {c['cap']:.0f} | "
                    f"{c['distill_gflop']:.2f} | {c['server_step_s']:.2f} |"
                )
        if fedavg is not None:
            cells = " | ".join(fmt(fedavg["test"][t]) for t in tiers)
            lines.append(
                f"| – | fedavg | {cells} | {fmt(fedavg['test']['mean_over_tiers'])} | "
                f"{fedavg['val']['mean_over_tiers']['mean']:.1f} | 0 | 0 | 0 |"
            )
    return "\n".join(lines)


def equal_compute(case: str, points: dict[str, Any], mode: str) -> str:
    """Each TAKFL point beside the baselines' point whose measured distillation GFLOP per
    round is nearest to TAKFL's (log scale), from the same mode's grid."""
    rows = [
        f"\n### {case}, {mode} budget, at equal distillation compute\n",
        "| takfl-reg cap | GFLOP | mean over tiers | baseline | its cap | GFLOP | "
        "mean over tiers | tiers takfl-reg / baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tag in sorted(points, key=budget_key):
        t = points[tag].get("takfl-reg")
        if t is None:
            continue
        g = t["costs"]["distill_gflop"]
        for b in ("fedet", "feddf"):
            cands = [(k, v[b]) for k, v in points.items() if b in v]
            k, row = min(cands, key=lambda kv: abs(math.log(kv[1]["costs"]["distill_gflop"] / g)))
            tiers = [x for x in t["test"] if x != "mean_over_tiers"]
            pairs = " ".join(
                f"{x} {t['test'][x]['mean']:.1f}/{row['test'][x]['mean']:.1f}" for x in tiers
            )
            rows.append(
                f"| {tag.lstrip('p')} | {g:.1f} | {fmt(t['test']['mean_over_tiers'])} | {b} | "
                f"{k.lstrip('p')} | {row['costs']['distill_gflop']:.1f} | "
                f"{fmt(row['test']['mean_over_tiers'])} | {pairs} |"
            )
    return "\n".join(rows)


def budget_key(tag: str) -> float:
    return math.inf if tag == "default" else float(tag.lstrip("p"))


def plot_case(case: str, modes: dict[str, Any], path: Path) -> None:
    """Accuracy against passes, one panel per tier and one for the mean over tiers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fedavg = modes.get("fedavg", {}).get("default", {}).get("fedavg")
    first = next(p for m, p in modes.items() if m != "fedavg")
    tiers = list(next(iter(next(iter(first.values())).values()))["test"])
    fig, axes = plt.subplots(1, len(tiers), figsize=(4.2 * len(tiers), 3.6), squeeze=False)
    colours = {"takfl-reg": "C0", "fedet": "C1", "feddf": "C2"}
    # the bundled defaults solid, any other rule or setting dashed
    styles = {"adaptive": "-", "fixed": "-"}
    for ax, tier in zip(axes[0], tiers, strict=True):
        for mode, points in modes.items():
            if mode == "fedavg":
                continue
            tags = sorted((t for t in points if t != "default"), key=budget_key)
            xs = [budget_key(t) for t in tags]
            for alg in METHODS:
                ys = [points[t][alg]["test"][tier] for t in tags if alg in points[t]]
                if len(ys) != len(xs):
                    continue
                mean = np.array([y["mean"] for y in ys])
                std = np.array([y["std"] for y in ys])
                ax.plot(
                    xs,
                    mean,
                    styles.get(mode, "--"),
                    color=colours[alg],
                    marker="o",
                    ms=3,
                    label=f"{alg} ({mode})",
                )
                ax.fill_between(xs, mean - std, mean + std, color=colours[alg], alpha=0.08)
        if fedavg is not None:
            ax.axhline(fedavg["test"][tier]["mean"], color="grey", lw=1, ls=":", label="fedavg")
        ax.set_xscale("log")
        ax.set_xlabel("budget: passes over the public set (the cap when adaptive)")
        ax.set_title("mean over tiers" if tier == "mean_over_tiers" else f"tier {tier}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%), final round")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{case}: accuracy against the distillation budget (3 seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


# -- trace -------------------------------------------------------------------------------
def cmd_trace(args: argparse.Namespace) -> None:
    """Record one round's server inputs, then trace each candidate distillation."""
    import torch

    from coordinator.engine import RoundEngine
    from coordinator.inputs import prototype_models, server_data
    from coordinator.transport.inprocess import InProcessTransport, VirtualClient
    from takfl.algorithms import resolve_algorithm
    from takfl.config import FederationConfig, prototype_training
    from takfl.federation_data import build_federation_data

    torch.set_num_threads(1)
    distill = {k: yaml.safe_load(v) for k, _, v in (kv.partition("=") for kv in args.set)}
    cfg = FederationConfig.model_validate(
        point_config(args.case, args.passes, adaptive=False, **distill)
    )
    algo = resolve_algorithm(cfg.algorithm, "takfl-reg")
    captured: dict[str, Any] = {}

    def recording_step(protos, data, algorithm, seed, timings):
        captured.update(protos=protos, data=data, seed=seed)
        return algo.unit.step(protos, data, algorithm, seed, timings)

    # client logits kept too, for FedET's targets
    rec = replace(algo, unit=replace(algo.unit, step=recording_step, client_logits=True))
    data = build_federation_data(cfg, args.seed)
    device = torch.device("cpu")
    trainings = {p.name: prototype_training(cfg, p.name) for p in cfg.prototypes}
    clients = [
        VirtualClient(client_id=cid, prototype=proto, x=x, y=y, training=trainings[proto])
        for cid, (proto, x, y) in data.clients.items()
    ]
    transport = InProcessTransport(
        clients, num_classes=data.num_classes, input_shape=data.input_shape, device=device
    )
    engine = RoundEngine(
        cfg,
        prototype_models(cfg),
        server_data(data, device),
        transport,
        algorithm=rec,
        device=device,
        seed=args.seed,
    )
    for r in range(1, args.round + 1):
        res = engine.run_round(r)
        print(
            f"round {r}: " + " ".join(f"{p}={a:.1f}" for p, a in res.accuracy.items()), flush=True
        )
    variants = [
        {k: float(x) for k, _, x in (kv.partition("=") for kv in v.split(","))}
        for v in args.variants.split(";")
        if v
    ]
    traces = trace_round(cfg, captured, args.passes, variants)
    out = {
        "settings": distill,
        "case": args.case,
        "seed": args.seed,
        "round": args.round,
        "passes": args.passes,
        "traces": traces,
    }
    args.json.write_text(json.dumps(out, indent=1))
    print(f"written: {args.json}")
    if args.plot is not None:
        plot_trace(out, args.plot)


def trace_round(
    cfg: Any, captured: dict[str, Any], passes: float, variants: list[dict[str, float]]
) -> dict[str, Any]:
    """Per student: per TAKFL teacher and for FedET and FedDF, (step, agreement with its
    target on the public set) and (step, validation accuracy) every quarter pass; the
    largest teacher's candidate, FedET and FedDF also with each variant's settings
    (``gamma``, ``T``, ``lr``) in place of the config's."""
    from takfl.distill import DistillSettings
    from takfl.training import predict_logits

    protos, data, seed = captured["protos"], captured["data"], captured["seed"]
    d = cfg.algorithm.distill
    every = max(1, round(0.25 * math.ceil(len(data.public_x) / d.batch_size)))
    base = {"gamma": d.self_reg_weight, "T": d.temperature, "lr": d.learning_rate}
    out: dict[str, Any] = {}
    for j, student in enumerate(protos):
        student.model.load_state_dict(student.avg_state)
        self_logits = predict_logits(student.model, data.public_x)
        runs = trace_objectives(cfg, protos, self_logits, base, "", all_teachers=True)
        for v in variants:
            tag = " [" + ", ".join(f"{k} {x:g}" for k, x in v.items()) + "]"
            runs |= trace_objectives(cfg, protos, self_logits, base | v, tag, all_teachers=False)
        rows = {}
        for name, (objective, target, lr) in runs.items():
            settings = DistillSettings(
                passes=passes,
                batch_size=d.batch_size,
                learning_rate=lr,
                weight_decay=d.weight_decay,
            )
            rows[name] = trace_one(
                student, data, objective, target, settings, every, seed * 1000 + j
            )
        out[student.name] = {
            "steps_per_pass": math.ceil(len(data.public_x) / d.batch_size),
            "curves": rows,
        }
    return out


def trace_objectives(
    cfg: Any,
    protos: list[Any],
    self_logits: Any,
    s: dict[str, float],
    tag: str,
    *,
    all_teachers: bool,
) -> dict[str, tuple[Any, Any, float]]:
    """name -> (objective, its target's labels on the public set, learning rate)."""
    from takfl.baselines import feddf_objective, feddf_target, fedet_objective, fedet_targets
    from takfl.distill import takfl_objective

    d = cfg.algorithm.distill
    teachers = [p for p in protos if p.mean_logits is not None]
    labels, diverse, has = fedet_targets([z for p in protos for z in p.client_logits])
    fdf = feddf_target([p.mean_logits for p in teachers], [p.num_clients for p in teachers])
    out = {
        f"takfl-reg/{t.name}{tag}": (
            takfl_objective(t.mean_logits, self_logits, s["T"], s["gamma"], d.self_reg_temperature),
            t.mean_logits.argmax(1),
            s["lr"],
        )
        for t in (teachers if all_teachers else teachers[-1:])
    }
    diversity = cfg.algorithm.fedet.diversity_weight
    out[f"fedet{tag}"] = (fedet_objective(labels, diverse, has, s["T"], diversity), labels, s["lr"])
    out[f"feddf{tag}"] = (feddf_objective(fdf, s["T"]), fdf.argmax(1), s["lr"])
    return out


def trace_one(
    student: Any, data: Any, objective: Any, target: Any, settings: Any, every: int, seed: int
) -> dict[str, list[list[float]]]:
    """(step, %) of agreement with ``target`` on the public set and of validation accuracy."""
    from takfl.distill import run_distillation
    from takfl.stopping import EarlyStopping

    curves = {}
    for score, (x, y) in {
        "agreement": (data.public_x, target),
        "val": (data.val_x, data.val_y),
    }.items():
        stop = EarlyStopping(x=x, labels=y, every=every, patience=10**9)
        run = run_distillation(
            student.model,
            student.avg_state,
            data.public_x,
            objective,
            settings,
            seed=seed,
            early_stopping=stop,
        )
        curves[score] = [[st, 100 * v] for st, v in run.scores]
    return curves


def plot_trace(out: dict[str, Any], path: Path, names: list[str] | None = None) -> None:
    """Agreement and validation accuracy against passes, a column per student; ``names``:
    only these curves (default: all)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = list(out["traces"])
    fig, axes = plt.subplots(2, len(students), figsize=(4.2 * len(students), 6.4), squeeze=False)
    for col, s in enumerate(students):
        tr = out["traces"][s]
        per_pass = tr["steps_per_pass"]
        for name, curves in tr["curves"].items():
            if names is not None and name not in names:
                continue
            ls = ":" if "[" in name else "-" if name.startswith("takfl") else "--"
            for row, score in enumerate(("agreement", "val")):
                pts = np.array(curves[score])
                axes[row][col].plot(pts[:, 0] / per_pass, pts[:, 1], ls, label=name)
        axes[0][col].set_title(f"student {s}")
        axes[0][col].set_ylabel("agreement with its target, public set (%)")
        axes[1][col].set_ylabel("validation accuracy (%)")
        axes[1][col].set_xlabel("passes over the public set")
        for row in range(2):
            axes[row][col].grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"{out['case']}, seed {out['seed']}, round {out['round']}: each distillation against steps"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


def cmd_plot_trace(args: argparse.Namespace) -> None:
    names = [n for n in args.names.split(";") if n] or None
    plot_trace(json.loads(args.json.read_text()), args.plot, names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--case", choices=CASES, required=True)
    run.add_argument("--mode", choices=("fixed", "adaptive"), default="fixed")
    run.add_argument("--passes", default=None, help="comma-separated budgets; none: the config's")
    run.add_argument("--seeds", default="0,1,2")
    run.add_argument("--methods", default=",".join(METHODS))
    run.add_argument("--rounds", type=int, default=None)
    run.add_argument("--fedavg", action="store_true", help="run FedAvg alone, once per seed")
    run.add_argument("--set", action="append", default=[], help="distill KEY=VALUE (repeatable)")
    run.add_argument("--tag", default=None, help="folder of a variant (default: the mode)")
    run.set_defaults(fn=cmd_run)
    summ = sub.add_parser("summarise")
    summ.add_argument("--runs", default=str(RUNS))
    summ.add_argument("--json", type=Path, default=None)
    summ.add_argument("--plots", type=Path, default=None)
    summ.add_argument(
        "--plot-modes",
        type=lambda v: v.split(","),
        default=None,
        help="comma-separated modes (folders) the plots draw; default: all",
    )
    summ.set_defaults(fn=cmd_summarise)
    tr = sub.add_parser("trace")
    tr.add_argument("--case", choices=CASES, required=True)
    tr.add_argument("--round", type=int, default=5)
    tr.add_argument("--passes", type=float, default=10.0)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--json", type=Path, required=True)
    tr.add_argument("--plot", type=Path, default=None)
    tr.add_argument("--set", action="append", default=[], help="distill KEY=VALUE (repeatable)")
    tr.add_argument(
        "--variants",
        default="",
        help="settings traced beside the config's, e.g. 'gamma=0.01;T=1,gamma=0.01;lr=0.003'",
    )
    tr.set_defaults(fn=cmd_trace)
    pt = sub.add_parser("plot-trace")
    pt.add_argument("--json", type=Path, required=True)
    pt.add_argument("--plot", type=Path, required=True)
    pt.add_argument("--names", default="", help="curves to draw, ';'-separated (default: all)")
    pt.set_defaults(fn=cmd_plot_trace)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
