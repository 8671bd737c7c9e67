"""``takfl-coordinator reproduce`` in its shortened CPU form: the paper's CIFAR-10
setting shrunk (few clients, one round, tiny subsets) on CIFAR batch files this test
writes, with the paper's values read from a data file."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.reproduce import load_paper_table
from takfl.config import load_federation
from takfl.run_layout import RESULTS_FILE


def write_cifar(root: Path) -> None:
    """Random images in the standard python-batch layout (CIFAR-10 250 + 30, CIFAR-100 40)."""
    rng = np.random.default_rng(0)

    def batch(n: int, classes: int, key: str) -> dict[str, object]:
        return {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            key: rng.integers(0, classes, n).tolist(),
        }

    c10 = root / "cifar-10-batches-py"
    c10.mkdir(parents=True)
    for i in range(1, 6):
        (c10 / f"data_batch_{i}").write_bytes(pickle.dumps(batch(50, 10, "labels")))
    (c10 / "test_batch").write_bytes(pickle.dumps(batch(30, 10, "labels")))
    c100 = root / "cifar-100-python"
    c100.mkdir()
    (c100 / "train").write_bytes(pickle.dumps(batch(40, 100, "fine_labels")))


def shrunk_setting(tmp_path: Path) -> Path:
    """cifar10-homo with its models and algorithm settings, but 4/2/1 clients and tiny budgets."""
    cfg = load_federation("cifar10-homo").model_dump(mode="json")
    cfg["data"].update(validation_size=20, public_size=16)
    cfg["partition"]["min_per_client"] = 5
    for proto, clients in zip(cfg["prototypes"], (4, 2, 1), strict=True):
        proto.update(clients=clients, sample_rate=0.5 if clients > 1 else 1.0)
        proto["training"].update(epochs=1, batch_size=64)
    cfg["algorithm"]["distill"].update(epochs=None, steps=1, batch_size=16)
    cfg["algorithm"]["lambdas"]["candidates_per_exponent"] = 2
    cfg["algorithm"]["distill"]["eval_every"] = 1
    path = tmp_path / "cifar10-homo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bundled_paper_table_names_its_source_and_holds_no_invented_values() -> None:
    table = load_paper_table()
    assert "2409.18461" in table.source
    assert set(table.settings) >= {"cifar10-homo", "cifar10-hetero"}


@pytest.mark.slow
def test_reproduce_smoke_prints_paper_values_beside_ours(tmp_path: Path) -> None:
    write_cifar(tmp_path / "data")
    setting = shrunk_setting(tmp_path)
    paper = {
        "source": "test table",
        "table": "Table X",
        "settings": {"cifar10-homo": {"fedavg": {"S": 11.5, "M": 22.5, "L": 33.5}}},
    }
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(paper))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "reproduce",
            "--settings",
            str(setting),
            "--data-dir",
            str(tmp_path / "data"),
            "--algorithms",
            "fedavg,takfl-reg",
            "--rounds",
            "1",
            "--paper-table",
            str(tmp_path / "paper.yaml"),
            "--device",
            "cpu",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "(11.50)" in result.output and "(33.50)" in result.output  # the paper's cells
    assert "(22.50)" in result.output and "n/a" in result.output  # takfl-reg: not given
    results = json.loads((out / "cifar10-homo" / RESULTS_FILE).read_text())["results"]
    assert set(results) == {"fedavg", "takfl-reg"}
    for by_tier in results.values():
        assert set(by_tier) == {"S", "M", "L"}
        assert all(0.0 <= v["mean"] <= 100.0 for v in by_tier.values())


def test_reproduce_refuses_a_bad_paper_table(tmp_path: Path) -> None:
    (tmp_path / "paper.yaml").write_text("source: x\nsettings: {a: {b: {S: high}}}\n")
    result = CliRunner().invoke(
        app, ["reproduce", "--paper-table", str(tmp_path / "paper.yaml"), "--device", "cpu"]
    )
    assert result.exit_code == 2
    assert "Traceback" not in result.output
