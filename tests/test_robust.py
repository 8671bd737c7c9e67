"""Properties of the aggregators on tiny tensors: each resists (or bounds) one outlier."""

from __future__ import annotations

import typing

import pytest
import torch

from takfl.config.federation import Aggregation, AggregationSpec
from takfl.fedavg import fedavg
from takfl.logits import ClientLogits
from takfl.robust import (
    AGGREGATORS,
    clipped_states,
    make_aggregator,
    median,
    reduce_states,
    trimmed_mean,
    weighted_mean,
)
from takfl.state import State


def honest(k: int, seed: int = 0) -> list[State]:
    """k client states close to w = 1, b = 0, with an integer counter."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.ones(3, 2) + 0.01 * torch.randn(3, 2, generator=g),
            "b": 0.01 * torch.randn(2, generator=g),
            "n": torch.tensor(10 + i, dtype=torch.int64),
        }
        for i in range(k)
    ]


def outlier(scale: float = 1000.0) -> State:
    return {"w": torch.full((3, 2), scale), "b": torch.full((2,), -scale), "n": torch.tensor(12)}


REFERENCE = {"w": torch.ones(3, 2), "b": torch.zeros(2), "n": torch.tensor(10)}


def aggregate(method: str, states: list[State], weights: list[float]) -> State:
    acc = make_aggregator(AggregationSpec(method=typing.cast(Aggregation, method))).states(
        REFERENCE
    )
    for s, w in zip(states, weights, strict=True):
        acc.add(s, w)
    assert acc.count == len(states)
    return acc.result()


def test_every_configurable_method_is_registered() -> None:
    assert set(typing.get_args(Aggregation)) == set(AGGREGATORS)


def test_fedavg_is_the_sample_weighted_mean() -> None:
    states, weights = honest(3), [1.0, 2.0, 5.0]
    out = aggregate("fedavg", states, weights)
    want = sum(s["w"] * w for s, w in zip(states, weights, strict=True)) / 8.0
    torch.testing.assert_close(out["w"], want)
    torch.testing.assert_close(out, fedavg(states, weights))
    assert out["n"].dtype == torch.int64


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
def test_median_and_trimmed_mean_resist_one_outlier(method: str) -> None:
    states = [*honest(4), outlier()]
    # the outlier also claims a huge weight: these methods ignore weights
    out = aggregate(method, states, [1.0, 1.0, 1.0, 1.0, 1e6])
    assert float((out["w"] - 1).abs().max()) < 0.05
    assert float(out["b"].abs().max()) < 0.05
    assert out["n"].dtype == torch.int64 and 10 <= int(out["n"]) <= 13
    # fedavg, for contrast, is dragged to the outlier
    assert float(aggregate("fedavg", states, [1.0, 1.0, 1.0, 1.0, 1e6])["w"].min()) > 900


def test_clipped_mean_bounds_one_clients_influence() -> None:
    states = [*honest(4), outlier()]
    out = aggregate("clipped-mean", states, [1.0] * 5)
    honest_norms = [float(torch.cat([(s["w"] - 1).flatten(), s["b"]]).norm()) for s in states[:4]]
    moved = float(torch.cat([(out["w"] - 1).flatten(), out["b"]]).norm())
    # every delta is clipped to the median norm (at most the largest honest norm), so the
    # mean moves no further than the largest honest delta; unclipped it would move ~2000
    assert moved <= max(honest_norms) + 1e-9
    unclipped = aggregate("fedavg", states, [1.0] * 5)
    assert float(torch.cat([(unclipped["w"] - 1).flatten(), unclipped["b"]]).norm()) > 100


def test_clipped_mean_leaves_equal_norms_alone() -> None:
    a = {"w": torch.ones(3, 2) * 2, "b": torch.zeros(2), "n": torch.tensor(10)}
    b = {"w": torch.zeros(3, 2), "b": torch.zeros(2), "n": torch.tensor(10)}
    out = clipped_states([a, b], [1.0, 3.0], REFERENCE, 1.0)
    torch.testing.assert_close(out["w"], torch.full((3, 2), 0.5))  # 1 + (1*1 + 3*-1)/4


def test_reducers_on_stacks() -> None:
    x = torch.tensor([[1.0], [2.0], [3.0], [100.0]], dtype=torch.float64)
    w = torch.ones(4, dtype=torch.float64)
    assert float(median(x)) == 2.5
    assert float(trimmed_mean(x, fraction=0.25)) == 2.5
    assert float(trimmed_mean(x, fraction=0.0)) == 26.5
    assert float(weighted_mean(x, w)) == 26.5
    with pytest.raises(ValueError, match="trim fraction"):
        trimmed_mean(x, fraction=0.5)


def test_aggregation_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="positive"):
        reduce_states(honest(2), [1.0, 0.0], median)
    with pytest.raises(ValueError, match="no client"):
        reduce_states([], [], median)
    with pytest.raises(ValueError, match="keys differ"):
        reduce_states([honest(1)[0], {"w": torch.ones(3, 2)}], [1.0, 1.0], median)


@pytest.mark.parametrize("method", ["median", "trimmed-mean", "clipped-mean"])
def test_teacher_logits_are_a_robust_mean(method: str) -> None:
    agg = make_aggregator(AggregationSpec(method=typing.cast(Aggregation, method)))
    acc = agg.logits()
    assert isinstance(acc, ClientLogits)
    for i in range(4):
        acc.add(torch.full((5, 3), float(i % 2)))  # 0, 1, 0, 1
    acc.add(torch.full((5, 3), 1e4))
    z = acc.mean()
    assert z.shape == (5, 3) and z.dtype == torch.float32
    assert float(z.abs().max()) <= 1.0 + 1e-6


def test_fedavg_teacher_logits_stream() -> None:
    acc = make_aggregator(AggregationSpec()).logits()
    acc.add(torch.zeros(2, 3))
    acc.add(torch.full((2, 3), 2.0))
    torch.testing.assert_close(acc.mean(), torch.ones(2, 3))
