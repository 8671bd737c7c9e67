"""Streaming accumulators of client logits on the public set (the ensemble teachers)."""

from __future__ import annotations

from collections.abc import Callable

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


class ClientLogits:
    """Keeps each client model's logits (N, C) and combines them with a robust reducer
    when asked (median, trimmed mean, clipped mean over clients). Memory: one (N, C)
    float32 tensor per client added, i.e. bounded by the clients sampled in a round."""

    def __init__(self, reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """reduce: ((K, N, C) float64 logits, (K,) weights) -> (N, C)."""
        self._reduce = reduce
        self._logits: list[torch.Tensor] = []

    @property
    def count(self) -> int:
        return len(self._logits)

    def add(self, logits: torch.Tensor) -> None:
        """logits: (N, C) of one client model on the public set."""
        if logits.ndim != 2:
            raise ValueError(f"logits must be (N, C), got {tuple(logits.shape)}")
        if self._logits and self._logits[0].shape != logits.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} differ from earlier {tuple(self._logits[0].shape)}"
            )
        self._logits.append(logits.detach().to(torch.float32).clone())

    def mean(self) -> torch.Tensor:
        """The robust mean over clients, (N, C) float32 on the logits' device."""
        if not self._logits:
            raise ValueError("no logits were added")
        stacked = torch.stack(self._logits).to(torch.float64)
        ones = torch.ones(len(self._logits), dtype=torch.float64, device=stacked.device)
        return self._reduce(stacked, ones).to(torch.float32)
