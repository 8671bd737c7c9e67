"""A private run with a run directory: the ledger in state.json, resume, the stop at the
budget, and epsilon in status and the Prometheus metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import coordinator.engine as engine_module
from coordinator.engine import RoundPolicy
from coordinator.metrics import PrometheusMetrics
from coordinator.privacy import PrivacyBudgetExceeded, with_privacy
from coordinator.service import FederationRun, ServeOptions
from coordinator.status import run_status
from coordinator.store import RunStore
from takfl.config import FederationConfig, load_federation
from takfl.federation_data import FederationData, build_federation_data
from takfl.privacy.accountant import epsilon_of
from takfl.server import StepOutput
from tests.test_privacy_engine import EchoTransport


@pytest.fixture(scope="module")
def data() -> FederationData:
    return build_federation_data(load_federation("digits"), 0)


@pytest.fixture(autouse=True)
def no_distillation(monkeypatch: pytest.MonkeyPatch) -> None:
    def step(protos: list[Any], data: Any, algo: Any, *, seed: int) -> tuple[Any, Any]:
        return {p.name: StepOutput(p.avg_state, None) for p in protos}, {}

    monkeypatch.setattr(engine_module, "server_step", step)


def _cfg(rounds_of_budget: int) -> FederationConfig:
    """Digits at z = 2 with a budget that lasts exactly ``rounds_of_budget`` rounds of L."""
    budget = epsilon_of("rdp", [(2.0, 1.0, rounds_of_budget)], 1e-5) * (1 + 1e-6)
    return with_privacy(
        load_federation("digits"),
        {"mode": "central-dp", "epsilon": budget, "noise_multiplier": 2.0},
    )


def _run(
    cfg: FederationConfig, data: FederationData, root: Path, rounds: int, resume: bool = False
) -> FederationRun:
    return FederationRun(
        cfg,
        data,
        EchoTransport(shift=0.01),
        RunStore(root),
        torch.device("cpu"),
        ServeOptions(rounds=rounds, resume=resume, policy=RoundPolicy(deadline_s=1)),
    )


def test_the_ledger_is_committed_with_each_round(data: FederationData, tmp_path: Path) -> None:
    _run(_cfg(2), data, tmp_path, rounds=2).run()

    state = RunStore(tmp_path).read_state()
    ledger = state["privacy"]
    assert ledger["mode"] == "central-dp"
    assert ledger["prototypes"]["L"]["history"] == [[2.0, 1.0, 2]]
    assert ledger["prototypes"]["L"]["epsilon"] == pytest.approx(
        epsilon_of("rdp", [(2.0, 1.0, 2)], 1e-5)
    )
    view, _ = run_status(tmp_path)
    assert view["epsilon L"].startswith(f"{ledger['prototypes']['L']['epsilon']:.3f} of ")


def test_a_run_longer_than_the_budget_is_refused_before_it_starts(
    data: FederationData, tmp_path: Path
) -> None:
    with pytest.raises(PrivacyBudgetExceeded, match="3 more round"):
        _run(_cfg(2), data, tmp_path, rounds=3)

    assert not (tmp_path / "state.json").exists()


def test_resuming_past_the_budget_is_refused(data: FederationData, tmp_path: Path) -> None:
    _run(_cfg(2), data, tmp_path, rounds=2).run()
    resumed = FederationRun(
        _cfg(2),
        data,
        EchoTransport(shift=0.01),
        RunStore(tmp_path),
        torch.device("cpu"),
        ServeOptions(rounds=2, resume=True),
    )
    resumed.options.rounds = 3  # as if --rounds 3 were given on resume

    with pytest.raises(PrivacyBudgetExceeded, match="1 more round"):
        resumed.prepare()


def test_the_run_stops_before_a_round_past_the_budget(data: FederationData, tmp_path: Path) -> None:
    run = _run(_cfg(2), data, tmp_path, rounds=2)
    run.options.rounds = 3  # the check at the start passed; the per-round check must hold

    results = run.run()

    state = RunStore(tmp_path).read_state()
    assert [r.round_id for r in results] == [1, 2]
    assert state["round"] == 2
    assert state["phase"] == "stopped: privacy budget"


def test_prometheus_shows_epsilon_per_prototype() -> None:
    metrics = PrometheusMetrics(["S", "L"])

    metrics.privacy_spent(3, {"S": 0.5, "L": 2.25}, 1e-5)

    assert metrics.registry.get_sample_value("takfl_privacy_epsilon", {"prototype": "L"}) == 2.25
    assert metrics.registry.get_sample_value("takfl_privacy_delta") == 1e-5


def test_the_report_lists_epsilon_per_round_and_tier() -> None:
    from coordinator.report.data import privacy_rows

    line = {"algorithm": "takfl-reg", "seed": 0, "prototype": "S", "test_accuracy": 50.0}
    dp = {"epsilon": 1.5, "delta": 1e-5, "noise_multiplier": 1.1, "clip_norm": 1.0}
    metrics = [
        {**line, "round": 1, "privacy": dp},
        {**line, "round": 2, "privacy": {**dp, "epsilon": 2.0}},
        {**line, "round": 1, "seed": 1, "privacy": dp},  # another seed: not shown
    ]

    rows = privacy_rows(metrics)

    assert [(r["round"], r["epsilon"]) for r in rows] == [(1, 1.5), (2, 2.0)]
    assert privacy_rows([{**line, "round": 1}]) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--compare", "takfl-reg,fedet"], "every client's own logits"),
        (["--config", "MEDIAN"], "aggregation 'median'"),
    ],
)
def test_simulate_refuses_what_central_dp_cannot_run(
    args: list[str], message: str, tmp_path: Path, write_yaml: Any
) -> None:
    from typer.testing import CliRunner

    from coordinator.cli import app

    cfg = load_federation("digits").model_dump(exclude_none=True)
    cfg["aggregation"]["method"] = "median"
    median = write_yaml("median.yaml", cfg)
    args = [str(median) if a == "MEDIAN" else a for a in args]

    result = CliRunner().invoke(
        app,
        ["simulate", *args, "--privacy", "central-dp", "--epsilon", "3", "--out", str(tmp_path)],
        terminal_width=200,
    )

    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "metrics.jsonl").exists()
