"""Batched distillation: a student's m distillations in one vmapped pass per batch.

Student j's m distillations (one per teacher) start from the same theta_avg_j and see
the same batch sequence; only the target differs. They run together: m copies of the
parameters and buffers are stacked along a new leading dimension,
``torch.func.functional_call`` runs under ``torch.vmap`` (stacked parameters and buffers
in_dims=0, the shared input batch in_dims=None), and the loss is the sum over copies of
each copy's own objective (:func:`takfl.distill.takfl_objective_stacked`). Copy k's
parameters receive only copy k's gradient, so one Adam over the stacked leaves is m
separate Adams: Adam, its L2 weight decay and its moment estimates are all elementwise,
and every copy takes the same number of steps. BatchNorm running statistics are updated
in place on the stacked buffers, per copy, exactly as in m separate runs. Under an
early-stopping rule each copy is scored and stops on its own (:mod:`takfl.stopping`).

Why vmap and not hand-written grouped convolutions: see :mod:`takfl.distill`. A model
whose forward cannot be vmapped is detected once by a probe (:func:`vmap_unsupported`)
and distilled sequentially, with the reason logged; on a CPU, :func:`batched_pays`
decides whether batching is worth it for a student.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from takfl.distill import (
    BatchedObjective,
    Distilled,
    DistillSettings,
    State,
    device_batches,
    precision_context,
)
from takfl.stacking import stack_copies, vmapped_forward
from takfl.stopping import EarlyStopping, Tracker, agreement

_PROBED: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()


def vmap_unsupported(model: nn.Module, sample_x: torch.Tensor) -> str | None:
    """Why ``model`` cannot be distilled batched (None: it can).

    Probes once per module instance: two stacked copies of its parameters and
    buffers (clones; the module is not changed) run forward and backward in train
    mode under vmap on two public samples.
    """
    if model in _PROBED:
        return _PROBED[model]
    was_training = model.training
    reason: str | None = None
    try:
        device = sample_x.device
        params = {
            k: stack_copies(v, 2, device).requires_grad_() for k, v in model.named_parameters()
        }
        buffers = {k: stack_copies(v, 2, device) for k, v in model.named_buffers()}
        model.train()
        vmapped_forward(model, shared_input=True)(
            params, buffers, sample_x[:2]
        ).float().sum().backward()
    except Exception as e:  # any failure means: use the sequential path
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        model.train(was_training)
    _PROBED[model] = reason
    return reason


# CPU cut-off for ``batched: auto``: forward FLOPs per sample of the student. Measured
# on a 2-core x86_64 CPU (README, server step benchmark): batched distillation is
# faster for the digits MLP (1.2 kFLOP) and small CNN (0.18 MFLOP), slower for the
# large CNN (2.7 MFLOP per sample),
# where the batching rules' extra passes (BatchNorm's affine applied as separate
# multiplies, layout copies around pooling) outweigh the Python overhead saved.
CPU_BATCHED_MAX_FLOPS = 1_000_000

_FLOPS: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def forward_flops_per_sample(model: nn.Module, sample_x: torch.Tensor) -> int:
    """FLOPs of one eval-mode forward on one sample (counted once per module instance)."""
    if model not in _FLOPS:
        from torch.utils.flop_counter import FlopCounterMode

        was_training = model.training
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(sample_x[:1])
        model.train(was_training)
        _FLOPS[model] = int(counter.get_total_flops())
    return _FLOPS[model]


def batched_pays(model: nn.Module, sample_x: torch.Tensor) -> bool:
    """The ``auto`` choice: batch on CUDA (one launch per layer instead of m), and on
    CPU for students cheaper than :data:`CPU_BATCHED_MAX_FLOPS` per sample."""
    if sample_x.device.type == "cuda":
        return True
    return forward_flops_per_sample(model, sample_x) < CPU_BATCHED_MAX_FLOPS


def distill_batched(
    model: nn.Module,
    start: State,
    public_x: torch.Tensor,
    objective: BatchedObjective,
    copies: int,
    settings: DistillSettings,
    *,
    seed: int,
) -> list[State]:
    """The states of :func:`run_distillations_batched` (see there)."""
    return [
        d.state
        for d in run_distillations_batched(
            model, start, public_x, objective, copies, settings, seed=seed
        )
    ]


def run_distillations_batched(
    model: nn.Module,
    start: State,
    public_x: torch.Tensor,
    objective: BatchedObjective,
    copies: int,
    settings: DistillSettings,
    *,
    seed: int,
    early_stopping: EarlyStopping | None = None,
    pool: torch.Tensor | None = None,
) -> list[Distilled]:
    """``copies`` distillations of ``model`` from the same ``start`` and batch sequence,
    in one vmapped pass per batch; equal (within float rounding) to ``copies`` calls of
    :func:`run_distillation` with the per-copy objectives that ``objective`` sums.

    The stacked parameters are the optimiser's leaves, shape (copies, *p.shape); one
    Adam over them equals one Adam per copy, since Adam and its weight decay act
    elementwise. Without ``early_stopping`` the loop holds no host synchronisation:
    batch indices are on the device beforehand and the loss is never read back. With
    it, every copy is scored and stops on its own (:class:`takfl.stopping.Tracker`):
    a stopped copy keeps its best checkpoint and its later updates are discarded; the
    loop ends when every copy stopped or the cap is reached.

    Args:
        model: a scratch module of the student's architecture; used as a function
            only (its own tensors are not changed).
        start: theta_avg_j, never modified.
        public_x: (N, ...) public inputs, on the compute device.
        objective: see :data:`BatchedObjective`.
        seed: fixes the batch sequence shared by every copy.
        early_stopping: labels (V,) or (copies, V); see :mod:`takfl.stopping`.
        pool: (P,) the public indices batches are drawn from (None: all N).
    Returns:
        per copy, the distilled state dict (CPU tensors, ``start``'s keys) and its steps.
    """
    device = public_x.device
    own = dict(model.state_dict(keep_vars=True))
    params = {
        k: stack_copies(start[k], copies, device).requires_grad_()
        for k, _ in model.named_parameters()
    }
    buffers = {
        k: stack_copies(start[k] if k in start else own[k], copies, device)
        for k, _ in model.named_buffers()
    }
    opt = torch.optim.Adam(
        list(params.values()), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    was_training = model.training
    stacked = {**params, **buffers}
    stop = early_stopping
    tracker = (
        Tracker(copies=copies, patience=stop.patience, ties_improve=stop.ties_improve)
        if stop is not None
        else None
    )
    best: list[State] = []
    if stop is not None and tracker is not None:
        tracker.observe(0, _stacked_scores(model, params, buffers, stop))
        best = [_copy_of(stacked, start, c) for c in range(copies)]
    model.train()
    forward = vmapped_forward(model, shared_input=True)
    if settings.compile:
        forward = torch.compile(forward)
    ran = 0
    for idx in device_batches(public_x.shape[0], settings, seed, device, pool):
        with precision_context(device, settings.precision):
            logits = forward(params, buffers, public_x[idx])
        loss = objective(logits.float(), idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ran += 1
        if stop is not None and tracker is not None and ran % stop.every == 0:
            for c in tracker.observe(ran, _stacked_scores(model, params, buffers, stop)):
                best[c] = _copy_of(stacked, start, c)
            if tracker.done:
                break
    if stop is not None and tracker is not None and ran % stop.every != 0:
        for c in tracker.observe(ran, _stacked_scores(model, params, buffers, stop)):
            best[c] = _copy_of(stacked, start, c)
    model.train(was_training)
    if tracker is None:
        return [
            Distilled(state=_cpu(_copy_of(stacked, start, c)), steps=ran, best_step=ran)
            for c in range(copies)
        ]
    return [
        Distilled(
            state=_cpu(best[c]),
            steps=tracker.steps_trained(c, ran),
            best_step=tracker.best_step[c],
            scores=tuple(tracker.history[c]),
        )
        for c in range(copies)
    ]


def _copy_of(stacked: State, start: State, copy: int) -> State:
    """Copy ``copy`` of the stacked tensors, on their device, with ``start``'s keys."""
    return {k: stacked[k][copy].detach().clone() for k in start}


def _cpu(state: State) -> State:
    return {k: v.to("cpu") for k, v in state.items()}


@torch.no_grad()
def _stacked_scores(
    model: nn.Module, params: State, buffers: State, stop: EarlyStopping
) -> list[float]:
    """Every copy's agreement with its labels, the copies in eval mode (BatchNorm on
    each copy's running statistics); leaves the module in train mode."""
    model.eval()
    forward = vmapped_forward(model, shared_input=True)
    logits = torch.cat(
        [forward(params, buffers, stop.x[i : i + 512]) for i in range(0, len(stop.x), 512)], dim=1
    )
    model.train()
    return agreement(logits.float(), stop.labels).tolist()
