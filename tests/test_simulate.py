"""``takfl-coordinator simulate`` end to end on real digits data (few rounds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from coordinator.cli import app
from takfl.config import load_federation
from takfl.run_layout import METRICS_FILE, PLOT_FILE, RESULTS_FILE


def small_digits_config(tmp_path: Path, **algorithm: object) -> Path:
    """The bundled digits federation with short distillation, for quick runs."""
    cfg = load_federation("digits").model_dump(mode="json")
    cfg["algorithm"]["distill"]["steps"] = 8
    cfg["algorithm"]["lambdas"]["search_candidates"] = 4
    cfg["algorithm"].update(algorithm)
    path = tmp_path / "digits-small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_simulate_writes_metrics_results_and_plot(tmp_path: Path) -> None:
    config = small_digits_config(tmp_path)
    out = tmp_path / "run"
    output = run_cli(
        [
            "simulate",
            "--config",
            str(config),
            "--compare",
            "takfl,fedavg",
            "--rounds",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert "final test accuracy" in output

    lines = [json.loads(x) for x in (out / METRICS_FILE).read_text().splitlines()]
    assert len(lines) == 2 * 2 * 3  # algorithms x rounds x prototypes
    takfl = [r for r in lines if r["algorithm"] == "takfl"]
    for rec in takfl:
        assert set(rec["lambdas"]) == {"S", "M", "L"}
        assert abs(sum(rec["lambdas"].values()) - 1.0) < 1e-5
        assert {"collect_s", "distill_s", "merge_s", "eval_s"} <= set(rec["timings"])
        assert 0.0 <= rec["test_accuracy"] <= 100.0
    assert all(r["lambdas"] is None for r in lines if r["algorithm"] == "fedavg")
    # every global model's validation accuracy is recorded, for choosing settings on it
    assert all(0.0 <= r["info"]["global_val_accuracy"] <= 100.0 for r in lines)

    results = json.loads((out / RESULTS_FILE).read_text())["results"]
    assert set(results) == {"takfl", "fedavg"}
    for by_proto in results.values():
        assert set(by_proto) == {"S", "M", "L"}
        for cell in by_proto.values():
            assert len(cell["per_seed"]) == 1
            assert cell["mean"] == pytest.approx(cell["per_seed"][0])
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_same_seed_gives_same_partition_and_numbers(tmp_path: Path) -> None:
    config = small_digits_config(tmp_path)
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        run_cli(
            [
                "simulate",
                "--config",
                str(config),
                "--algorithm",
                "takfl-reg",
                "--rounds",
                "2",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        runs.append(
            [
                (r["prototype"], r["test_accuracy"], r["lambdas"])
                for r in map(json.loads, (out / METRICS_FILE).read_text().splitlines())
            ]
        )
    assert runs[0] == runs[1]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["feddf", "fedet"])
def test_baselines_run_through_the_same_engine(tmp_path: Path, algorithm: str) -> None:
    config = small_digits_config(tmp_path)
    out = tmp_path / algorithm
    run_cli(
        [
            "simulate",
            "--config",
            str(config),
            "--algorithm",
            algorithm,
            "--rounds",
            "1",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    results = json.loads((out / RESULTS_FILE).read_text())["results"]
    assert set(results[algorithm]) == {"S", "M", "L"}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fixed", "learned", "unsupervised", "heuristic"])
def test_every_lambda_strategy_runs(tmp_path: Path, strategy: str) -> None:
    lambdas = {
        "strategy": strategy,
        "learn_steps": 3,
        "search_candidates": 4,
        "matrix": [[0.2, 0.3, 0.5], [0.1, 0.2, 0.7], [0.0, 0.0, 1.0]],
    }
    config = small_digits_config(tmp_path, lambdas=lambdas)
    out = tmp_path / strategy
    run_cli(
        ["simulate", "--config", str(config), "--rounds", "1", "--out", str(out), "--device", "cpu"]
    )
    rec = [json.loads(x) for x in (out / METRICS_FILE).read_text().splitlines()]
    if strategy == "fixed":
        lam = {r["prototype"]: r["lambdas"] for r in rec}
        assert lam["L"] == pytest.approx({"S": 0.0, "M": 0.0, "L": 1.0})
        assert lam["S"] == pytest.approx({"S": 0.2, "M": 0.3, "L": 0.5})


def test_bad_arguments_exit_with_a_message(tmp_path: Path) -> None:
    for args, fragment in [
        (["simulate", "--algorithm", "fedprox"], "unknown algorithm"),
        (["simulate", "--lambda-strategy", "magic"], "unknown lambda strategy"),
        (["simulate", "--algorithm", "takfl", "--no-validation"], "withholds"),
        (["simulate", "--compression", "bf8"], "unknown compression"),
        (["simulate", "--budget", "greedy"], "unknown --budget"),
        (["simulate", "--config", str(tmp_path / "missing.yaml")], "file not found"),
    ]:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert fragment in result.output
        assert "Traceback" not in result.output


@pytest.mark.slow
def test_console_script_runs_a_real_process(tmp_path: Path) -> None:
    config = small_digits_config(tmp_path)
    out = tmp_path / "proc"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "simulate",
            "--config",
            str(config),
            "--algorithm",
            "fedavg",
            "--rounds",
            "1",
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / RESULTS_FILE).exists()


def test_partition_command_prints_every_client() -> None:
    output = run_cli(["partition", "--config", "digits"])
    for name in ("test", "validation", "public", "S/client-9", "M/client-4", "L/client-1"):
        assert name in output


def _write_cifar(root: Path) -> None:
    """Random images in the standard python-batch layout, large enough for the paper's
    100/20/4-client partition (CIFAR-10 train 12,000, test 500; CIFAR-100 train 6,000)."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)

    def batch(n: int, classes: int, label_key: str) -> dict:  # type: ignore[type-arg]
        return {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: rng.integers(0, classes, n).tolist(),
        }

    c10 = root / "cifar-10-batches-py"
    c10.mkdir(parents=True)
    for i in range(1, 6):
        (c10 / f"data_batch_{i}").write_bytes(pickle.dumps(batch(2400, 10, "labels")))
    (c10 / "test_batch").write_bytes(pickle.dumps(batch(500, 10, "labels")))
    (c10 / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    c100 = root / "cifar-100-python"
    c100.mkdir()
    (c100 / "train").write_bytes(pickle.dumps(batch(6000, 100, "fine_labels")))
    (c100 / "test").write_bytes(pickle.dumps(batch(100, 100, "fine_labels")))


@pytest.mark.slow
def test_paper_cifar_config_loads_and_partitions_from_local_batches(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    result = CliRunner().invoke(
        app,
        ["partition", "--config", "cifar10-homo", "--data-dir", str(tmp_path)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    output = result.output
    assert "S/client-99" in output and "M/client-19" in output and "L/client-3" in output

    from takfl.federation_data import build_federation_data

    data = build_federation_data(load_federation("cifar10-homo"), 0, tmp_path)
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10
    assert len(data.test_x) == 500  # CIFAR-10's own test split
    # the config asks for the whole CIFAR-100 train set (50,000); here it is the 6,000 written
    assert len(data.public_x) == 6000
    assert len(data.val_x) == 500  # the config's validation_size
    assert sum(len(y) for _, _, y in data.clients.values()) == 12000 - 500
