"""benchmarks/bandwidth.py: per-seed codec runs merged into tables and the goal's check."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bandwidth.py"
FP32 = {"S": 1000, "M": 10_000}


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bandwidth_tables", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bandwidth_tables"] = mod
    spec.loader.exec_module(mod)
    return mod


def write_run(
    root: Path, name: str, seed: int, acc: dict[str, float], sizes: dict[str, list[float]]
) -> None:
    """A simulate output folder: metrics.jsonl (one round per size) and results.json."""
    d = root / name
    d.mkdir(parents=True)
    rounds = len(next(iter(sizes.values())))
    lines = [
        {
            "algorithm": "takfl-reg",
            "seed": seed,
            "round": r + 1,
            "prototype": tier,
            "test_accuracy": acc[tier] if r == rounds - 1 else acc[tier] - 20,
            "upload_bytes": sizes[tier][r],
            "fp32_bytes": FP32[tier],
        }
        for r in range(rounds)
        for tier in acc
    ]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (d / "results.json").write_text(json.dumps({"codecs": {"S": name, "M": name}}))


def test_rows_average_sizes_and_compare_with_the_baseline_on_shared_seeds(
    tmp_path: Path,
) -> None:
    # Prepare: fp16 on seeds 0, 1; sign1 on seeds 0, 1, 2 (seed 2 has no baseline)
    mod = load_script()
    half = {"S": [500.0, 500.0], "M": [5000.0, 5000.0]}
    write_run(tmp_path, "digits-fp16-s0", 0, {"S": 80, "M": 90}, half)
    write_run(tmp_path, "digits-fp16-s1", 1, {"S": 70, "M": 90}, half)
    small = {"S": [20.0, 40.0], "M": [250.0, 250.0]}
    write_run(tmp_path, "digits-sign1-s0", 0, {"S": 80, "M": 89}, small)
    write_run(tmp_path, "digits-sign1-s1", 1, {"S": 70, "M": 90}, small)
    write_run(tmp_path, "digits-sign1-s2", 2, {"S": 10, "M": 10}, small)
    (tmp_path / "digits-rot2-s0").mkdir()  # unfinished: no results.json

    # Execute
    tables = {c: mod.compare(t, "fp16", 0.03, 0.5) for c, t in mod.collect(tmp_path).items()}

    # Assert
    assert set(tables) == {"digits"} and set(tables["digits"]) == {"fp16", "sign1"}
    sign1 = tables["digits"]["sign1"]
    assert sign1["seeds"] == [0, 1, 2]
    assert sign1["tiers"]["S"]["ratio"] == pytest.approx(0.03)  # mean of 0.02 and 0.04
    assert sign1["tiers"]["S"]["ratio_max_round"] == pytest.approx(0.04)
    assert sign1["tiers"]["M"]["bytes"] == pytest.approx(250.0)
    assert sign1["tiers"]["S"]["accuracy"]["mean"] == pytest.approx(160 / 3)
    vs = sign1["vs_baseline"]
    assert vs["seeds"] == [0, 1]  # seed 2 is not compared
    assert vs["mean_over_tiers_diff"] == pytest.approx(-0.25)
    assert vs["largest_tier_ratio"] == pytest.approx(0.03)
    assert vs["goal_met"]
    assert "vs_baseline" not in tables["digits"]["fp16"]
    assert not mod.compare(mod.collect(tmp_path)["digits"], "fp16", 0.029, 0.5)["sign1"][
        "vs_baseline"
    ]["goal_met"]
    text = mod.markdown("digits", tables["digits"], "fp16")
    assert text.splitlines()[4].startswith("| fp16 | 500 (0.5000) | 5,000 (0.5000)")
    assert "| sign1 | 30 (0.0300) | 250 (0.0250) |" in text and "| -0.25 | 0,1,2 |" in text
