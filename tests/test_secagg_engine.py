"""Secure aggregation in the round engine: what the mode refuses, the secure mean and its
sum check, and a simulation whose every prototype's round is a real SecAgg+ round (the
engine never sees an update)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from coordinator.simulate import SimulationSpec, run_simulation
from takfl.algorithms import resolve_algorithm
from takfl.config import FederationConfig, load_federation
from takfl.config.federation import AggregationSpec
from takfl.config.privacy import PrivacySpec
from takfl.privacy.modes import PrivacyConfigError, resolve_privacy
from takfl.robust import make_aggregator
from takfl.run_layout import METRICS_FILE
from takfl.secagg.aggregate import SecureMean
from takfl.secagg.messages import round_graph
from takfl.secagg.vector import add_vector, delta_vector, vector_length
from tests.test_simulate import small_digits_config

SECAGG = PrivacySpec(mode="secagg")


@pytest.mark.parametrize(
    ("algorithm", "aggregation", "said"),
    [
        ("fedet", "fedavg", "distils from every client's own logits"),
        ("takfl-reg", "median", "receives only each prototype's sum"),
    ],
)
def test_secagg_refuses_what_needs_individual_updates(
    algorithm: str, aggregation: str, said: str
) -> None:
    spec = load_federation("digits").algorithm
    with pytest.raises(PrivacyConfigError, match=said):
        resolve_privacy(
            SECAGG,
            resolve_algorithm(spec, algorithm),
            make_aggregator(AggregationSpec(method=aggregation)),
        )
    mode = resolve_privacy(
        SECAGG, resolve_algorithm(spec, "takfl-reg"), make_aggregator(AggregationSpec())
    )
    assert mode.secure_sum and mode.teacher_from_aggregate


def test_the_default_graph_is_full_when_small_and_sparse_when_large() -> None:
    assert round_graph(2) == (1, 2)  # no single survivor's input is ever unmasked
    assert round_graph(10) == (9, 5)
    assert round_graph(200) == (16, 9)
    assert round_graph(20, neighbours=5, threshold=9) == (6, 7)  # even k, t <= k + 1


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "b.weight": torch.randn(3, 2, generator=g),
        "a.bias": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
    }


def test_vectors_lay_out_floating_entries_by_name() -> None:
    base = _state()
    trained = {k: v + 1 if v.is_floating_point() else v + 5 for k, v in base.items()}
    v = delta_vector(trained, base)
    assert v.shape == (vector_length(base),) == (10,)
    assert np.allclose(v, 1.0)
    back = add_vector(base, v, 0.5)
    assert torch.allclose(back["a.bias"], base["a.bias"] + 0.5)
    assert int(back["bn.num_batches_tracked"]) == 7  # integers keep the reference's


def test_the_secure_mean_releases_sum_over_contributors_and_refuses_a_dishonest_sum() -> None:
    base = _state()
    mean = SecureMean(base, bound=1.0)
    with pytest.raises(TypeError):
        mean.add(base)
    mean.set_sum(np.full(10, 0.3), ("A", "B", "C"))
    assert mean.count == 3 and mean.failure is None
    assert torch.allclose(mean.result()["a.bias"], base["a.bias"] + 0.1)
    unclipped = SecureMean(base, bound=1.0)
    unclipped.set_sum(np.full(10, 5.0), ("A", "B"))  # norm 15.8 > 2 x 1
    assert not unclipped.releases and "exceeds 2 x the clipping bound" in str(unclipped.failure)
    poisoned = SecureMean(base, bound=1.0)
    poisoned.set_sum(np.array([np.nan] * 10), ("A", "B"))
    assert not poisoned.releases and "NaN" in str(poisoned.failure)


def _final(
    cfg: FederationConfig, out: Path, rounds: int = 2
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """TAKFL (paper form) for ``rounds``: the metrics rows and the final accuracy per tier."""
    spec = SimulationSpec(algorithms=[resolve_algorithm(cfg.algorithm, "takfl-reg")], rounds=rounds)
    run_simulation(cfg, spec, out, torch.device("cpu"))
    rows = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    return rows, {r["prototype"]: r["test_accuracy"] for r in rows if r["round"] == rounds}


def test_secagg_dp_needs_a_budget_and_releases_over_the_sampled() -> None:
    with pytest.raises(ValueError, match="secagg-dp needs a budget"):
        PrivacySpec(mode="secagg-dp")
    base = _state()
    mean = SecureMean(base, bound=1.0, denominator=4, noise_std=0.5)
    mean.set_sum(np.full(10, 0.8), ("A", "B"))  # noised: within 2 x C + the noise's norm
    assert mean.releases
    assert torch.allclose(mean.result()["a.bias"], base["a.bias"] + 0.2)  # over 4 sampled


@pytest.mark.slow
def test_a_secagg_dp_simulation_spends_its_budget(tmp_path: Path) -> None:
    cfg = load_federation(small_digits_config(tmp_path))
    private = PrivacySpec(mode="secagg-dp", epsilon=8.0)
    rows, _ = _final(cfg.model_copy(update={"privacy": private}), tmp_path / "dp", rounds=1)
    for r in rows:
        assert r["clients"] == r["sampled"] and 0 < r["privacy"]["epsilon"] <= 8.0 * (1 + 1e-9)
    assert min(r["privacy"]["epsilon"] for r in rows) > 7.0  # calibrated to spend it in 1 round


@pytest.mark.slow
def test_a_secagg_simulation_aggregates_every_prototype_securely(tmp_path: Path) -> None:
    plain = load_federation(small_digits_config(tmp_path))
    _, expected = _final(plain, tmp_path / "plain")
    rows, final = _final(plain.model_copy(update={"privacy": SECAGG}), tmp_path / "secagg")

    assert len(rows) == 6
    for r in rows:  # every sampled client is in its prototype's sum, nothing kept back
        assert r["clients"] == r["sampled"] >= 2 and not r["kept_previous"], r
    # the same training, aggregated unweighted through masks and fixed point: close to
    # the plain (sample-weighted) FedAvg run of the same seed
    gap = np.mean([final[p] - expected[p] for p in final])
    assert abs(gap) <= 5.0, (final, expected)
    assert min(final["M"], final["L"]) > 50.0, final
