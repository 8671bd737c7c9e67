"""The state-dict type every module speaks: parameter and buffer name -> tensor.

``State`` is a model's weights as ``nn.Module.state_dict()`` gives them (and as a
checkpoint, an update or an aggregate holds them); ``StateView`` is the read-only
form for functions that only look.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

State = dict[str, torch.Tensor]
StateView = Mapping[str, torch.Tensor]


def non_finite_entry(state: StateView) -> str | None:
    """Name of the first floating-point entry of ``state`` (in its order) holding NaN or
    inf, else None: the check every receiver of a model makes before using it. Integer
    entries (e.g. BatchNorm's ``num_batches_tracked``) are never reported."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None
