"""benchmarks/budget.py's summaries on a small synthetic runs tree: accuracy per tier and
seed read from metrics.jsonl, the goal check, and the table the defaults are chosen on."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "budget.py"
TIERS = ("S", "M", "L")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("budget_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["budget_bench"] = module
    spec.loader.exec_module(module)
    return module


def write_run(folder: Path, seed: int, accuracy: dict[str, dict[str, tuple[float, float]]]) -> None:
    """One simulate run: algorithm -> tier -> (test, validation) in its final round 2."""
    folder.mkdir(parents=True)
    lines = []
    for alg, tiers in accuracy.items():
        for round_id in (1, 2):
            for tier, (test, val) in tiers.items():
                lines.append(
                    {
                        "round": round_id,
                        "algorithm": alg,
                        "prototype": tier,
                        "seed": seed,
                        "test_accuracy": test - (2 - round_id) * 10,
                        "lambdas": None,
                        "timings": {"distill_s": 1.0, "merge_s": 0.5},
                        "info": {
                            "global_val_accuracy": val,
                            "distill_cap": 20.0,
                            "distill_steps": 12.0,
                            "distill_gflop": 0.5,
                        },
                    }
                )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (folder / "results.json").write_text("{}")


def tiers(test: tuple[float, float, float], val: float) -> dict[str, tuple[float, float]]:
    return {t: (a, val) for t, a in zip(TIERS, test, strict=True)}


def test_summaries_goal_and_settings_table(bench: ModuleType, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed, shift in ((0, 0.0), (1, 2.0)):
        write_run(
            runs / "toy" / "adaptive" / "p10" / f"s{seed}",
            seed,
            {
                "takfl-reg": tiers((60 + shift, 90, 98), 80 + shift),
                "fedet": tiers((62 + shift, 88, 97), 79),
                "feddf": tiers((55, 85, 99), 78),
            },
        )
        write_run(
            runs / "toy" / "fixed-T3" / "p10" / f"s{seed}",
            seed,
            {a: tiers((50, 80, 97), 70) for a in ("takfl-reg", "fedet", "feddf")},
        )
        write_run(
            runs / "toy" / "fedavg" / "default" / f"s{seed}",
            seed,
            {"fedavg": tiers((40, 70, 99.5), 60)},
        )
    data = bench.collect(runs)
    point = data["toy"]["adaptive"]["p10"]
    takfl = point["takfl-reg"]
    assert takfl["test"]["S"]["per_seed"] == [60.0, 62.0]  # the final round, per seed
    assert takfl["test"]["mean_over_tiers"]["mean"] == pytest.approx((61 + 90 + 98) / 3)
    assert takfl["costs"]["server_step_s"] == 1.5 and takfl["costs"]["cap"] == 20.0
    # S trails FedET by 2, L trails FedDF by 1 and FedAvg's L - 1 by 0.5: named, with gaps
    assert bench.goal_misses(point, data["toy"]) == [
        "S -2.0 vs fedet",
        "L -1.0 vs feddf",
        "L -0.5 vs fedavg - 1",
    ]
    table = bench.settings_table(data, "p10")
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    # every method's validation, mean over cases: (81 + 79 + 78) / 3 against 70
    assert rows["adaptive"].endswith("| 81.00 | 79.33 |")
    assert rows["fixed-T3"].endswith("| 70.00 | 70.00 |")
    assert "fedavg" not in rows  # no point at 10 passes
