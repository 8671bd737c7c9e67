"""Copies of one module run side by side: their parameters and buffers stacked on a new
leading dimension and the module called through ``torch.func.functional_call`` under
``torch.vmap``. Batched distillation (:mod:`takfl.distill`: m copies of a student, one
shared input batch) and vectorised virtual clients (:mod:`takfl.vectorised_training`: G
clients, a batch each) both run on this.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from takfl.state import State

StackedForward = Callable[[State, State, torch.Tensor], torch.Tensor]


def stack_copies(t: torch.Tensor, copies: int, device: torch.device | None = None) -> torch.Tensor:
    """(copies, *t.shape): ``copies`` independent (cloned, detached) copies of ``t``."""
    t = t.detach() if device is None else t.detach().to(device)
    return t.unsqueeze(0).expand(copies, *t.shape).clone()


def vmapped_forward(model: nn.Module, *, shared_input: bool) -> StackedForward:
    """``f(params, buffers, x)`` running ``model`` once per stacked copy; ``x`` is one batch
    for every copy (``shared_input``) or a batch per copy, stacked the same way. Buffers
    (BatchNorm running statistics) are updated in place, per copy."""

    def call(p: State, b: State, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (p, b), (x,))

    return torch.vmap(call, in_dims=(0, 0, None if shared_input else 0), randomness="different")
