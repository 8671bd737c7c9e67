"""Bounds a received update meets inside the whole-delta norm bound.

The norm bound of :mod:`takfl.wire.validation` caps ``||delta||`` over the whole state,
so an update may still put all of it on one small tensor (a classifier bias, say) or
give BatchNorm statistics values that are finite but meaningless. Two checks close
that, both pure and never raising:

- :func:`check_tensor_norms`: every floating weight tensor's delta within
  ``tensor_factor x`` its reference norm, the tensor's norm in the run's *initial* global
  model (floored per element for tensors that start at zero). The reference is fixed
  when the run starts, so an accepted update cannot loosen the next round's bounds (a
  bound relative to the current global grows with every update it lets through).
- :func:`check_buffers`: the non-weight state of the new model (global + delta) against
  the global: BatchNorm running variances > 0 and at most ``buffer_factor x`` the
  global's largest (or 1), other floating buffers (running means) within
  ``buffer_factor x`` the global's largest magnitude (or 1), integer counters
  (``num_batches_tracked``) never below the global's and at most ``max_batches`` above.

A :class:`StateBounds` per prototype holds what both need; the round engine builds it
from the initial global and the model's buffer names (:func:`state_bounds`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from takfl.wire.validation import ACCEPTED, Refusal, Verdict, refuse

VARIANCE_SUFFIX = "running_var"  # BatchNorm / InstanceNorm running variance
DEFAULT_TENSOR_FACTOR = 4.0  # honest digits deltas measured at <= 0.36 x the initial norm
DEFAULT_TENSOR_FLOOR = 0.05  # per element: a zero-initialised tensor counts as 0.05 RMS
DEFAULT_BUFFER_FACTOR = 100.0
DEFAULT_MAX_BATCHES = 1_000_000  # batches one round of local training may count


@dataclass(frozen=True, kw_only=True)
class StateBounds:
    """What one prototype's updates must meet besides layout, finiteness and the whole
    norm bound.

    ``tensor_caps``: weight tensor name -> largest delta L2 norm (None: not checked);
    ``buffers``: names of the non-weight entries, judged by :func:`check_buffers`;
    ``reference_norm``: L2 norm of the initial global's floating weights, the reference
    of the whole-delta bound.
    """

    tensor_caps: Mapping[str, float] | None
    buffers: frozenset[str]
    reference_norm: float
    buffer_factor: float = DEFAULT_BUFFER_FACTOR
    max_batches: int = DEFAULT_MAX_BATCHES

    def __post_init__(self) -> None:
        if not (math.isfinite(self.buffer_factor) and self.buffer_factor >= 1):
            raise ValueError(f"buffer_factor must be a number >= 1, got {self.buffer_factor}")
        if self.max_batches < 0:
            raise ValueError(f"max_batches must be >= 0, got {self.max_batches}")


def reference_norms(
    initial: Mapping[str, torch.Tensor], buffers: Iterable[str], *, floor: float
) -> dict[str, float]:
    """name -> ``max(||initial_t||, floor * sqrt(numel_t))`` for every floating tensor of
    ``initial`` that is not a buffer."""
    skip = set(buffers)
    return {
        k: max(float(torch.linalg.vector_norm(t.to(torch.float64))), floor * math.sqrt(t.numel()))
        for k, t in initial.items()
        if t.is_floating_point() and k not in skip
    }


def state_bounds(
    initial: Mapping[str, torch.Tensor],
    buffers: Iterable[str],
    *,
    tensor_factor: float | None = DEFAULT_TENSOR_FACTOR,
    tensor_floor: float = DEFAULT_TENSOR_FLOOR,
    buffer_factor: float = DEFAULT_BUFFER_FACTOR,
    max_batches: int = DEFAULT_MAX_BATCHES,
) -> StateBounds:
    """Bounds of a prototype from its initial global state and its model's buffer names;
    ``tensor_factor`` None leaves per-tensor norms unchecked."""
    names = frozenset(buffers)
    weights = {k: t for k, t in initial.items() if t.is_floating_point() and k not in names}
    total = math.sqrt(sum(float((t.to(torch.float64) ** 2).sum()) for t in weights.values()))
    caps = None
    if tensor_factor is not None:
        if not (math.isfinite(tensor_factor) and tensor_factor > 0):
            raise ValueError(f"tensor_factor must be a positive number, got {tensor_factor}")
        refs = reference_norms(initial, names, floor=tensor_floor)
        caps = {k: tensor_factor * r for k, r in refs.items()}
    return StateBounds(
        tensor_caps=caps,
        buffers=names,
        reference_norm=total,
        buffer_factor=buffer_factor,
        max_batches=max_batches,
    )


def check_tensor_norms(delta: Mapping[str, torch.Tensor], bounds: StateBounds) -> Verdict:
    """Every capped tensor's delta (same names as the caps; layout already checked)
    within its cap; the first one over it is named."""
    if bounds.tensor_caps is None:
        return ACCEPTED
    for name, cap in bounds.tensor_caps.items():
        t = delta.get(name)
        if t is None:
            continue
        norm = float(torch.linalg.vector_norm(t.detach().to(torch.float64)))
        if norm > cap:
            return refuse(
                Refusal.TENSOR_BOUND,
                f"{name}: delta norm {norm:.4g} > bound {cap:.4g} (from the run's initial model)",
            )
    return ACCEPTED


def _largest(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def _check_variance(name: str, new: torch.Tensor, ref: torch.Tensor, factor: float) -> Verdict:
    if new.numel() == 0:
        return ACCEPTED
    low = float(new.min())
    if not low > 0:
        return refuse(Refusal.BAD_VARIANCE, f"{name}: running variance {low:.4g} is not > 0")
    cap = factor * max(_largest(ref), 1.0)
    if (high := _largest(new)) > cap:
        return refuse(Refusal.BAD_VARIANCE, f"{name}: running variance {high:.4g} > {cap:.4g}")
    return ACCEPTED


def _check_counter(name: str, new: torch.Tensor, ref: torch.Tensor, most: int) -> Verdict:
    step = new.to(torch.int64) - ref.to(torch.int64)
    if step.numel() == 0:
        return ACCEPTED
    if int(step.min()) < 0:
        return refuse(
            Refusal.BAD_COUNTER, f"{name}: {int(new.min())} is below the global's {int(ref.min())}"
        )
    if int(step.max()) > most:
        return refuse(Refusal.BAD_COUNTER, f"{name}: grew by {int(step.max())} > {most} in a round")
    return ACCEPTED


def check_buffers(
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    bounds: StateBounds,
) -> Verdict:
    """The buffers of ``state`` (the new model: global + delta; layout already checked)
    against ``reference`` (the global the delta is of), in ``bounds.buffers``' name order."""
    for name in sorted(bounds.buffers):
        new, ref = state.get(name), reference.get(name)
        if new is None or ref is None:
            continue
        if not new.is_floating_point():
            verdict = _check_counter(name, new, ref, bounds.max_batches)
        elif name.rpartition(".")[2] == VARIANCE_SUFFIX:
            verdict = _check_variance(name, new, ref, bounds.buffer_factor)
        else:
            cap = bounds.buffer_factor * max(_largest(ref), 1.0)
            high = _largest(new)
            verdict = ACCEPTED
            if high > cap:
                verdict = refuse(Refusal.BUFFER_BOUND, f"{name}: |value| {high:.4g} > {cap:.4g}")
        if not verdict.accepted:
            return verdict
    return ACCEPTED


def check_state(
    delta: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    bounds: StateBounds,
) -> Verdict:
    """:func:`check_tensor_norms` on ``delta``, then :func:`check_buffers` on ``state``
    (``reference`` + ``delta``) against ``reference``."""
    verdict = check_tensor_norms(delta, bounds)
    return verdict if not verdict.accepted else check_buffers(state, reference, bounds)
