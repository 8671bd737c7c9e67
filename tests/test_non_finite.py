"""The one finite check every receiver of a state dict makes (``takfl.state``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from takfl.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, save_checkpoint
from takfl.models import build_model
from takfl.state import non_finite_entry


def test_a_finite_state_has_no_bad_entry() -> None:
    # Prepare
    state = {"w": torch.randn(3, 2), "b": torch.zeros(2), "steps": torch.tensor(7)}
    # Execute
    bad = non_finite_entry(state)
    # Assert
    assert bad is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_the_first_non_finite_entry_is_named(value: float) -> None:
    # Prepare: two bad entries; the first in the dict's order is reported
    late = torch.ones(4)
    late[2] = value
    early = torch.ones(2, 2, dtype=torch.float16)
    early[1, 0] = value
    state = {"ok": torch.ones(3), "early": early, "late": late}
    # Execute
    bad = non_finite_entry(state)
    # Assert
    assert bad == "early"


def test_integer_entries_are_never_reported() -> None:
    # Prepare: an integer buffer at its extreme value, then a bad float
    state = {
        "num_batches_tracked": torch.tensor(torch.iinfo(torch.int64).max),
        "w": torch.tensor([1.0, float("nan")], dtype=torch.float64),
    }
    # Execute
    bad = non_finite_entry(state)
    # Assert
    assert bad == "w"


def test_an_empty_state_has_no_bad_entry() -> None:
    assert non_finite_entry({}) is None


def test_a_checkpoint_with_a_nan_tensor_is_refused_by_name(tmp_path: Path) -> None:
    # Prepare: a real model's checkpoint with one poisoned tensor
    meta = CheckpointMeta(
        prototype="S", round=1, builder="mlp_digits", num_classes=10, input_shape=(1, 8, 8)
    )
    state = build_model("mlp_digits", 10, (1, 8, 8)).state_dict()
    name = next(k for k, t in state.items() if t.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    path = tmp_path / "S.safetensors"
    save_checkpoint(path, state, meta)
    # Execute / Assert
    with pytest.raises(CheckpointError, match=f"tensor {name} holds NaN or inf values"):
        load_checkpoint(path)
