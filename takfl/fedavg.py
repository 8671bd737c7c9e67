"""Sample-weighted FedAvg over every state-dict entry, usable one client at a time."""

from __future__ import annotations

import torch

from takfl.state import State


class FedAvgAccumulator:
    """Streaming weighted average of state dicts.

    Float entries (weights, BatchNorm running statistics) are summed in float64
    and averaged; integer entries (e.g. ``num_batches_tracked``) get the rounded
    weighted average. A client's state can be dropped right after ``add``.
    """

    def __init__(self) -> None:
        self._sums: State = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, state: State, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"client weight must be positive, got {weight}")
        if self._sums and set(state) != set(self._sums):
            raise ValueError("state dict keys differ from earlier clients' keys")
        for key, value in state.items():
            contrib = value.detach().to(torch.float64) * weight
            if key in self._sums:
                if self._sums[key].shape != value.shape:
                    raise ValueError(
                        f"{key}: shape {tuple(value.shape)} differs from earlier "
                        f"{tuple(self._sums[key].shape)}"
                    )
                self._sums[key] += contrib.to(self._sums[key].device)
            else:
                self._sums[key] = contrib.clone()
                self._dtypes[key] = value.dtype
        self.total_weight += weight
        self.count += 1

    def result(self) -> State:
        """The weighted average, each entry in its original dtype."""
        if self.count == 0:
            raise ValueError("no client state was added")
        out: State = {}
        for key, total in self._sums.items():
            mean = total / self.total_weight
            dtype = self._dtypes[key]
            out[key] = mean.round().to(dtype) if not dtype.is_floating_point else mean.to(dtype)
        return out


def fedavg(states: list[State], weights: list[float]) -> State:
    """Weighted average of ``states`` (weights are e.g. sample counts)."""
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    acc = FedAvgAccumulator()
    for s, w in zip(states, weights, strict=True):
        acc.add(s, w)
    return acc.result()
