"""The local optimisers (Adam, SGD with momentum), in plain tensor operations.

``torch.optim`` imports ``torch._dynamo`` the first time an optimiser steps or zeroes its
gradients, and ``torch._inductor`` with it: about 85 MB of resident memory on this
machine's torch 2.13 (``benchmarks/agent_rss.py``), paid by every edge agent although it
never compiles anything. These two follow torch's single-tensor CPU implementations
operation for operation, so a step gives the same bits as ``torch.optim.Adam`` /
``torch.optim.SGD`` with the same settings (``tests/test_optim.py``); the coordinator's
own optimisation (distillation, λ learning) keeps using ``torch.optim``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

SGD_MOMENTUM = 0.9  # momentum of the "sgd" optimiser (torch and the ExecuTorch runtime)
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults
ADAM_EPS = 1e-8


class LocalOptimizer:
    """Adam (``optimizer="adam"``) or SGD with momentum ``SGD_MOMENTUM`` over ``params``,
    with L2 weight decay added to the gradient as torch does (not decoupled).

    ``zero_grad()`` drops the gradients; ``step()`` updates every parameter that has one.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        optimizer: str,
        learning_rate: float,
        weight_decay: float = 0.0,
    ) -> None:
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimiser {optimizer!r} (adam or sgd)")
        self.params = [p for p in params if p.requires_grad]
        self.adam = optimizer == "adam"
        self.lr = learning_rate
        self.weight_decay = weight_decay
        # per parameter (by position), created at its first gradient as torch does
        self._first: dict[int, torch.Tensor] = {}  # exp_avg (Adam) / momentum buffer (SGD)
        self._second: dict[int, torch.Tensor] = {}  # exp_avg_sq (Adam)
        self._steps: dict[int, int] = {}  # Adam's step count, for the bias corrections

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay != 0:
                g = g.add(p, alpha=self.weight_decay)
            if self.adam:
                self._adam(i, p, g)
            else:
                self._sgd(i, p, g)

    def _sgd(self, i: int, p: torch.Tensor, g: torch.Tensor) -> None:
        buf = self._first.get(i)
        if buf is None:
            buf = self._first[i] = torch.clone(g).detach()
        else:
            buf.mul_(SGD_MOMENTUM).add_(g)
        p.add_(buf, alpha=-self.lr)

    def _adam(self, i: int, p: torch.Tensor, g: torch.Tensor) -> None:
        b1, b2 = ADAM_BETAS
        if i not in self._first:
            self._first[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._second[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
        step = self._steps[i] = self._steps.get(i, 0) + 1
        m, v = self._first[i], self._second[i]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g.conj(), value=1 - b2)
        step_size = self.lr / (1 - b1**step)
        bias_correction2_sqrt = (1 - b2**step) ** 0.5
        denom = (v.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
        p.addcdiv_(m, denom, value=-step_size)
