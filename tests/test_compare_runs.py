"""Merging simulate runs: seeds from separate folders, lambdas per round, scale counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.compare import final_accuracy, lambdas_per_round, read_metrics, scale_counts
from takfl.run_layout import METRICS_FILE


def write_run(folder: Path, seed: int, accs: dict[str, float], scale: float = 1.0) -> Path:
    folder.mkdir(parents=True)
    lines = []
    for rnd in (1, 2):
        for alg in ("takfl-scaled", "fedavg"):
            for proto, acc in accs.items():
                lines.append(
                    {
                        "algorithm": alg,
                        "seed": seed,
                        "round": rnd,
                        "prototype": proto,
                        "test_accuracy": acc + rnd,
                        "lambdas": {"S": 0.25 * rnd, "L": 1 - 0.25 * rnd}
                        if alg == "takfl-scaled"
                        else None,
                        "info": {"scale": scale} if alg == "takfl-scaled" else {},
                    }
                )
    (folder / METRICS_FILE).write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return folder


def test_seeds_from_separate_runs_merge(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", 0, {"S": 10.0, "L": 50.0}, scale=0.5)
    b = write_run(tmp_path / "b", 1, {"S": 20.0, "L": 60.0})
    records = read_metrics([a, b])
    final = final_accuracy(records)
    assert final["fedavg"]["S"]["per_seed"] == [12.0, 22.0]  # last round: acc + 2
    assert final["fedavg"]["L"]["mean"] == pytest.approx(57.0)
    assert final["fedavg"]["L"]["std"] == pytest.approx(5.0)
    lams = lambdas_per_round(records, "takfl-scaled")
    assert lams["S"]["S"] == [0.25, 0.5] and lams["L"]["L"] == [0.75, 0.5]
    assert scale_counts(records) == {"0.5": 4, "1": 4}


def test_a_seed_in_two_runs_is_refused(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", 0, {"S": 10.0})
    b = write_run(tmp_path / "b", 0, {"S": 20.0})
    with pytest.raises(ValueError, match="seed 0 appears in both"):
        read_metrics([a, b])
    result = CliRunner().invoke(app, ["compare-runs", str(a), str(b)])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_compare_runs_command_prints_the_table_and_plots(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", 0, {"S": 10.0, "L": 50.0})
    plot = tmp_path / "lam.png"
    result = CliRunner().invoke(
        app, ["compare-runs", str(a), "--lambdas-of", "takfl-scaled", "--plot", str(plot)]
    )
    assert result.exit_code == 0, result.output
    assert "fedavg" in result.output and "12.00" in result.output
    assert plot.stat().st_size > 1000
