"""The state dict every model's weights travel as, and the checks every receiver makes
of one before using it."""

from __future__ import annotations

from collections.abc import Mapping

import torch

State = dict[str, torch.Tensor]  # a model's state dict: parameter and buffer name -> tensor


def non_finite_entry(state: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the first floating-point entry of ``state`` (in its order) holding NaN or
    inf, else None. Integer entries (e.g. BatchNorm's ``num_batches_tracked``) are never
    reported."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None
