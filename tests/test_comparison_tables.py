"""benchmarks/comparison.py: per-seed runs merged into tables and the goal's checks."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "comparison.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("comparison_tables", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["comparison_tables"] = mod
    spec.loader.exec_module(mod)
    return mod


def write_run(d: Path, seed: int, acc: dict[str, dict[str, float]], rounds: int = 2) -> Path:
    """A metrics.jsonl as simulate writes it; validation accuracy = test - 1."""
    d.mkdir(parents=True)
    lines = []
    for alg, tiers in acc.items():
        for r in range(1, rounds + 1):
            for tier, a in tiers.items():
                v = a if r == rounds else a - 30.0
                lines.append(
                    {
                        "algorithm": alg,
                        "seed": seed,
                        "round": r,
                        "prototype": tier,
                        "test_accuracy": v,
                        "info": {"global_val_accuracy": v - 1.0},
                    }
                )
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return d


def test_tables_use_the_final_round_and_the_mean_over_tiers_per_seed(tmp_path: Path) -> None:
    mod = load_script()
    runs = [
        write_run(
            tmp_path / "s0",
            0,
            {"takfl-reg": {"S": 40, "M": 80, "L": 99}, "feddf": {"S": 30, "M": 70, "L": 99}},
        ),
        write_run(
            tmp_path / "s1",
            1,
            {"takfl-reg": {"S": 50, "M": 70, "L": 97}, "feddf": {"S": 40, "M": 80, "L": 98}},
        ),
    ]
    from coordinator.compare import read_metrics

    records = read_metrics(runs)
    s = mod.summarise(mod.final_by_seed(records, "test"))
    assert s["takfl-reg"]["S"]["per_seed"] == [40.0, 50.0]
    assert s["takfl-reg"]["S"]["mean"] == pytest.approx(45.0)
    assert s["takfl-reg"]["S"]["std"] == pytest.approx(5.0)
    assert s["takfl-reg"]["mean_over_tiers"]["per_seed"] == pytest.approx([73.0, 72.333333])
    val = mod.summarise(mod.final_by_seed(records, "val"))
    assert val["feddf"]["L"]["mean"] == pytest.approx(97.5)

    lines = mod.goal(s, ["S", "M", "L"])
    assert "mean over tiers 72.67 vs feddf 69.50: met" in lines
    assert "tier M 75.0 vs feddf 75.0: met" in lines
    assert "tier L 98.0 vs feddf 98.5: NOT met" in lines
    table = mod.markdown(s, ["S", "M", "L"])
    assert "| takfl-reg | 45.0 ± 5.0 | 75.0 ± 5.0 | 98.0 ± 1.0 | 72.67 ± 0.33 | 0,1 |" in table


def test_validation_metric_refuses_runs_without_it(tmp_path: Path) -> None:
    mod = load_script()
    d = write_run(tmp_path / "s0", 0, {"fedavg": {"S": 10, "M": 20, "L": 30}})
    rec = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    for r in rec:
        r["info"] = {}
    with pytest.raises(ValueError, match="global_val_accuracy"):
        mod.final_by_seed(rec, "val")
