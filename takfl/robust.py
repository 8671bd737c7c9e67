"""Robust aggregation of client updates and of client logits, registered by name.

Pure functions over lists of state dicts (or a stack of logits), and a registry
that turns ``aggregation.method`` of a federation config into an
:class:`Aggregator` once, at the entry point. Every aggregator offers two
accumulators the round engine feeds one client at a time: one for the weights
(theta_avg of a prototype) and one for the teacher logits on the public set, so
a robust aggregate of the weights goes with a robust mean of the logits.

FedAvg streams (nothing per client is kept); the others keep the sampled
clients' states and logits until the round closes, which bounds their memory by
the number of clients sampled for the prototype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from takfl.config.federation import AggregationSpec
from takfl.fedavg import FedAvgAccumulator
from takfl.logits import ClientLogits, MeanLogits
from takfl.state import State

Reducer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (K, ...) values, (K,) weights


# -- reducers over a stack of K client values (dim 0), float64 ---------------------------------
def weighted_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x: (K, ...), w: (K,) positive -> (...) the w-weighted mean."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    return (x * w.reshape(shape)).sum(0) / w.sum()


def median(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """x: (K, ...) -> (...) coordinate-wise median (mean of the two middle values for even
    K, as numpy's median and Flower's FedMedian). Weights are ignored."""
    s = x.sort(dim=0).values
    k = x.shape[0]
    return s[k // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) / 2


def trimmed_mean(
    x: torch.Tensor, w: torch.Tensor | None = None, *, fraction: float
) -> torch.Tensor:
    """x: (K, ...) -> (...) coordinate-wise mean after dropping the ``floor(fraction * K)``
    largest and as many smallest values (Yin et al. 2018; Flower's FedTrimmedAvg).
    ``fraction`` in [0, 0.5), so at least one value stays. Weights are ignored."""
    if not 0 <= fraction < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {fraction}")
    k = x.shape[0]
    cut = int(fraction * k)
    return x.sort(dim=0).values[cut : k - cut].mean(0)


def clip_scales(norms: torch.Tensor, factor: float) -> torch.Tensor:
    """norms: (K,) -> (K,) factors in (0, 1] that bring each norm down to at most
    ``factor`` x the median norm."""
    bound = factor * median(norms)
    return torch.where(norms > bound, bound / norms.clamp_min(1e-30), torch.ones_like(norms))


def clipped_mean(
    x: torch.Tensor, w: torch.Tensor, *, center: torch.Tensor, factor: float
) -> torch.Tensor:
    """x: (K, ...) around ``center`` (...): each deviation ``x_k - center`` is scaled so its
    L2 norm is at most ``factor`` x the median deviation norm, then ``center`` + the
    w-weighted mean of the clipped deviations."""
    dev = x - center
    norms = dev.reshape(dev.shape[0], -1).norm(dim=1)
    scaled = dev * clip_scales(norms, factor).reshape((-1,) + (1,) * (x.ndim - 1))
    return center + weighted_mean(scaled, w)


# -- whole state dicts --------------------------------------------------------------------------
def _stack(states: list[State], key: str) -> torch.Tensor:
    return torch.stack([s[key].detach().to("cpu", torch.float64) for s in states])


def _cast(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(like.dtype) if like.is_floating_point() else value.round().to(like.dtype)


def _check(states: list[State], weights: list[float]) -> None:
    if not states:
        raise ValueError("no client state to aggregate")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    if any(not w > 0 for w in weights):
        raise ValueError(f"client weights must be positive, got {weights}")
    keys = set(states[0])
    if any(set(s) != keys for s in states):
        raise ValueError("state dict keys differ between clients")


def reduce_states(states: list[State], weights: list[float], reducer: Reducer) -> State:
    """Apply ``reducer`` key by key to the clients' stacked values (float64), each result
    in its original dtype (integer entries rounded)."""
    _check(states, weights)
    w = torch.tensor(weights, dtype=torch.float64)
    return {k: _cast(reducer(_stack(states, k), w), v) for k, v in states[0].items()}


def clipped_states(
    states: list[State], weights: list[float], reference: State, factor: float
) -> State:
    """Weighted mean of the clients' deltas against ``reference`` (the round's global),
    each delta first scaled to at most ``factor`` x the median delta norm (the norm over
    every floating entry, as the intake bounds it). Integer entries: weighted mean."""
    _check(states, weights)
    floats = [k for k, v in reference.items() if v.is_floating_point()]
    deltas = [
        {k: s[k].detach().to("cpu", torch.float64) - reference[k].to(torch.float64) for k in floats}
        for s in states
    ]
    norms = torch.tensor(
        [sum(float((d[k] ** 2).sum()) for k in floats) ** 0.5 for d in deltas],
        dtype=torch.float64,
    )
    scales = clip_scales(norms, factor)
    w = torch.tensor(weights, dtype=torch.float64)
    out: State = {}
    for k, ref in reference.items():
        if k in floats:
            stacked = torch.stack([d[k] * scales[i] for i, d in enumerate(deltas)])
            out[k] = _cast(ref.to(torch.float64) + weighted_mean(stacked, w), ref)
        else:
            out[k] = _cast(weighted_mean(_stack(states, k), w), ref)
    return out


# -- accumulators the engine feeds one client at a time ------------------------------------------
class StateAccumulator(Protocol):
    @property
    def count(self) -> int: ...

    def add(self, state: State, weight: float) -> None: ...

    def result(self) -> State: ...


class LogitsAccumulator(Protocol):
    @property
    def count(self) -> int: ...

    def add(self, logits: torch.Tensor) -> None: ...

    def mean(self) -> torch.Tensor: ...


class BufferedStates:
    """Keeps each client's state (on the CPU) and reduces them when asked."""

    def __init__(self, reduce: Callable[[list[State], list[float]], State]) -> None:
        self._reduce = reduce
        self._states: list[State] = []
        self._weights: list[float] = []

    @property
    def count(self) -> int:
        return len(self._states)

    def add(self, state: State, weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"client weight must be positive, got {weight}")
        self._states.append({k: v.detach().to("cpu").clone() for k, v in state.items()})
        self._weights.append(float(weight))

    def result(self) -> State:
        return self._reduce(self._states, self._weights)


# -- the registry -------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Aggregator:
    """A configured aggregation: fresh accumulators for one prototype's round."""

    name: str
    reference: str  # where the method is published
    streaming: bool  # True: nothing per client is kept
    states: Callable[[State], StateAccumulator]  # reference (the round's global) -> accumulator
    logits: Callable[[], LogitsAccumulator]


def _fedavg(spec: AggregationSpec) -> Aggregator:
    return Aggregator(
        name="fedavg",
        reference="McMahan et al. 2017, arXiv 1602.05629",
        streaming=True,
        states=lambda reference: FedAvgAccumulator(),
        logits=MeanLogits,
    )


def _median(spec: AggregationSpec) -> Aggregator:
    return Aggregator(
        name="median",
        reference="Yin et al. 2018, arXiv 1803.01498 (coordinate-wise median)",
        streaming=False,
        states=lambda reference: BufferedStates(lambda s, w: reduce_states(s, w, median)),
        logits=lambda: ClientLogits(median),
    )


def _trimmed(spec: AggregationSpec) -> Aggregator:
    beta = spec.trim_fraction

    def reducer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return trimmed_mean(x, w, fraction=beta)

    return Aggregator(
        name="trimmed-mean",
        reference="Yin et al. 2018, arXiv 1803.01498 (coordinate-wise trimmed mean)",
        streaming=False,
        states=lambda reference: BufferedStates(lambda s, w: reduce_states(s, w, reducer)),
        logits=lambda: ClientLogits(reducer),
    )


def _clipped(spec: AggregationSpec) -> Aggregator:
    factor = spec.clip_factor

    def logits_reducer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return clipped_mean(x, w, center=median(x), factor=factor)

    return Aggregator(
        name="clipped-mean",
        reference="norm clipping of client updates, Sun et al. 2019, arXiv 1911.07963",
        streaming=False,
        states=lambda reference: BufferedStates(
            lambda s, w: clipped_states(s, w, reference, factor)
        ),
        logits=lambda: ClientLogits(logits_reducer),
    )


AGGREGATORS: dict[str, Callable[[AggregationSpec], Aggregator]] = {
    "fedavg": _fedavg,
    "median": _median,
    "trimmed-mean": _trimmed,
    "clipped-mean": _clipped,
}


def make_aggregator(spec: AggregationSpec) -> Aggregator:
    """The aggregator ``spec.method`` names, with its parameters."""
    try:
        build = AGGREGATORS[spec.method]
    except KeyError:
        raise ValueError(
            f"unknown aggregation {spec.method!r}; known: {', '.join(AGGREGATORS)}"
        ) from None
    return build(spec)
