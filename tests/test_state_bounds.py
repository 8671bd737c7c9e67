"""Bounds inside the whole-delta norm bound (takfl.wire.bounds): per-tensor deltas against
the run's initial model, BatchNorm statistics and counters against the global; and the
intake refusing both by name."""

from __future__ import annotations

import math

import pytest
import torch

from takfl.wire.bounds import (
    StateBounds,
    check_buffers,
    check_state,
    check_tensor_norms,
    reference_norms,
    state_bounds,
)
from takfl.wire.chunking import split
from takfl.wire.codec import apply_delta, make_delta
from takfl.wire.update import prepare_update
from takfl.wire.validation import Refusal, UpdateBounds, check_delta
from tests.test_update_intake import CHUNK, Fixture, reason

torch.set_num_threads(1)
BUFFERS = frozenset({"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"})


def initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fc.weight": torch.randn(10, 16, generator=g) * 0.25,  # norm ~ 3.2
        "fc.bias": torch.zeros(10),  # starts at zero: the floor applies
        "bn.running_mean": torch.zeros(16),
        "bn.running_var": torch.ones(16),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }


def bounds(**kw: object) -> StateBounds:
    return state_bounds(initial(), BUFFERS, tensor_factor=4.0, tensor_floor=0.05, **kw)  # type: ignore[arg-type]


def with_change(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**initial(), key: value}


def test_reference_norms_floor_zero_tensors_and_skip_buffers() -> None:
    # Prepare
    state = initial()
    # Execute
    refs = reference_norms(state, BUFFERS, floor=0.05)
    # Assert
    assert set(refs) == {"fc.weight", "fc.bias"}
    assert refs["fc.bias"] == pytest.approx(0.05 * math.sqrt(10))
    assert refs["fc.weight"] == pytest.approx(float(state["fc.weight"].norm()), rel=1e-6)


def test_a_delta_on_one_small_tensor_is_refused_inside_the_whole_norm_bound() -> None:
    # Prepare: the attack, the whole allowed norm on one class's bias
    base = initial()
    allowed = UpdateBounds().max_norm(base)
    delta = {k: torch.zeros_like(v) for k, v in base.items() if v.is_floating_point()}
    delta["fc.bias"][3] = 0.99 * allowed
    # Execute
    whole = check_delta(
        {**delta, "bn.num_batches_tracked": base["bn.num_batches_tracked"]},
        base,
        bounds=UpdateBounds(),
    )
    per_tensor = check_tensor_norms(delta, bounds())
    # Assert
    assert whole.accepted  # what let it through before
    assert per_tensor.reason is Refusal.TENSOR_BOUND and "fc.bias" in per_tensor.detail


def test_honest_sized_deltas_pass_every_tensor_bound() -> None:
    # Prepare: 0.3 x every tensor's reference, as honest digits deltas measure
    base = initial()
    refs = reference_norms(base, BUFFERS, floor=0.05)
    delta = {
        k: torch.full_like(base[k], 0.3 * r / math.sqrt(base[k].numel())) for k, r in refs.items()
    }
    # Execute
    verdict = check_tensor_norms(delta, bounds())
    # Assert
    assert verdict.accepted, verdict


def test_the_bound_does_not_grow_with_the_global() -> None:
    # Prepare: a global loosened by an accepted poisoned update (bias 116, as in the issue)
    loosened = with_change("fc.bias", torch.tensor([116.0] + [0.0] * 9))
    delta = {k: torch.zeros_like(v) for k, v in loosened.items() if v.is_floating_point()}
    delta["fc.bias"][3] = 4 * UpdateBounds().norm_factor * 3.3  # ~5 x the initial norm x 4
    b = bounds()
    # Execute
    old_rule = check_delta(
        {**delta, "bn.num_batches_tracked": loosened["bn.num_batches_tracked"]},
        loosened,
        bounds=UpdateBounds(),
    )
    fixed = check_delta(
        {**delta, "bn.num_batches_tracked": loosened["bn.num_batches_tracked"]},
        loosened,
        bounds=UpdateBounds(),
        reference_norm=b.reference_norm,
    )
    # Assert
    assert old_rule.accepted  # relative to the current global, the bound had grown
    assert fixed.reason is Refusal.NORM_BOUND and "initial global" in fixed.detail
    assert b.reference_norm == pytest.approx(float(initial()["fc.weight"].norm()), rel=1e-6)


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("bn.running_var", -torch.ones(16), Refusal.BAD_VARIANCE),  # the issue's -1
        ("bn.running_var", torch.zeros(16), Refusal.BAD_VARIANCE),
        ("bn.running_var", torch.full((16,), 101.0), Refusal.BAD_VARIANCE),
        ("bn.running_mean", torch.full((16,), -101.0), Refusal.BUFFER_BOUND),
        ("bn.num_batches_tracked", torch.tensor(6), Refusal.BAD_COUNTER),
        ("bn.num_batches_tracked", torch.tensor(7 + 1_000_001), Refusal.BAD_COUNTER),
        ("bn.running_var", torch.full((16,), 1e-6), None),  # tiny but positive: finite
        ("bn.running_var", torch.full((16,), 100.0), None),
        ("bn.running_mean", torch.full((16,), 50.0), None),
        ("bn.num_batches_tracked", torch.tensor(7 + 1_000_000), None),
    ],
)
def test_buffer_semantics(key: str, value: torch.Tensor, why: Refusal | None) -> None:
    # Prepare
    state = with_change(key, value)
    # Execute
    verdict = check_buffers(state, initial(), bounds())
    # Assert
    assert verdict.reason is why, verdict
    if why is not None:
        assert key in verdict.detail


def test_buffer_bounds_follow_the_global() -> None:
    # Prepare: a global whose variances are 30, so 3,000 is within 100 x
    global_state = with_change("bn.running_var", torch.full((16,), 30.0))
    state = with_change("bn.running_var", torch.full((16,), 3000.0))
    # Execute / Assert
    assert check_buffers(state, global_state, bounds()).accepted
    assert check_buffers(state, initial(), bounds()).reason is Refusal.BAD_VARIANCE


def test_per_tensor_check_can_be_switched_off_and_factors_are_checked() -> None:
    off = state_bounds(initial(), BUFFERS, tensor_factor=None)
    delta = {"fc.bias": torch.full((10,), 100.0)}
    assert off.tensor_caps is None and check_tensor_norms(delta, off).accepted
    with pytest.raises(ValueError, match="tensor_factor"):
        state_bounds(initial(), BUFFERS, tensor_factor=-1.0)
    with pytest.raises(ValueError, match="buffer_factor"):
        StateBounds(tensor_caps=None, buffers=BUFFERS, reference_norm=1.0, buffer_factor=0.5)


def test_check_state_runs_both_in_order() -> None:
    base = initial()
    trained = with_change("bn.running_var", -torch.ones(16))
    delta = make_delta(trained, base)
    assert (
        check_state(delta, apply_delta(base, delta), base, bounds()).reason is Refusal.BAD_VARIANCE
    )
    trained["fc.bias"] = torch.full((10,), 100.0)
    delta = make_delta(trained, base)
    assert (
        check_state(delta, apply_delta(base, delta), base, bounds()).reason is Refusal.TENSOR_BOUND
    )


def test_the_intake_refuses_by_name_once_bounds_are_set() -> None:
    # Prepare: the intake's fixture (w 16x8, b 16), bounds from its global as initial model
    f = Fixture()
    f.intake.state_bounds = {"S": state_bounds(f.state, frozenset(), tensor_factor=4.0)}
    bias_only = {"w": f.state["w"], "b": f.state["b"] + 3.0}  # ||db|| = 12 > 4 x 0.2
    poisoned = prepare_update(
        f.task,
        bias_only,
        f.state,
        secret=f.registry["a1"].secret,
        num_samples=5,
        chunk_size=256,
        compression="fp32",
    )
    # Execute
    assert f.header(poisoned.header).verdict.accepted
    decisions = f.chunks(split(poisoned.blob, CHUNK))
    # Assert
    assert reason(decisions[-1]) == Refusal.TENSOR_BOUND.value
