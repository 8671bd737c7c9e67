"""Streaming accumulators of client logits on the public set (the ensemble teachers)."""

from __future__ import annotations

import torch


class MeanLogits:
    """Z(x) = mean over added client models of their logits, (N, C), accumulated in float64."""

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self.count = 0

    def add(self, logits: torch.Tensor) -> None:
        """logits: (N, C) of one client model on the public set."""
        if logits.ndim != 2:
            raise ValueError(f"logits must be (N, C), got {tuple(logits.shape)}")
        x = logits.detach().to(torch.float64)
        if self._sum is None:
            self._sum = x.clone()
        elif self._sum.shape != x.shape:
            raise ValueError(
                f"logits {tuple(x.shape)} differ from earlier {tuple(self._sum.shape)}"
            )
        else:
            self._sum += x
        self.count += 1

    def mean(self) -> torch.Tensor:
        if self._sum is None:
            raise ValueError("no logits were added")
        return (self._sum / self.count).to(torch.float32)

    def merge(self, other: MeanLogits) -> MeanLogits:
        """A new accumulator holding both sets of clients (for FedDF's all-client mean)."""
        out = MeanLogits()
        for acc in (self, other):
            if acc._sum is not None:
                if out._sum is None:
                    out._sum = acc._sum.clone()
                else:
                    out._sum += acc._sum
                out.count += acc.count
        return out
