"""Knowledge distillation with KD self-regularisation (TAKFL step 5).

For student j and teacher i, starting from theta_avg_j, minimise over public x:

    L = T^2  KL(softmax(Z_i/T)     || softmax(s/T))
      + gamma Ts^2 KL(softmax(S_avg_j/Ts) || softmax(s/Ts))

where s are the student's logits, Z_i the teacher ensemble's mean logits and
S_avg_j the logits of theta_avg_j itself (computed once).

Batched distillation. Student j's m distillations (one per teacher) start from the
same theta_avg_j and see the same batch sequence; only the target differs. They run
together: m copies of the parameters and buffers are stacked along a new leading
dimension, ``torch.func.functional_call`` runs under ``torch.vmap`` (stacked
parameters and buffers in_dims=0, the shared input batch in_dims=None), and the loss
is the sum over copies of each copy's own objective. Copy k's parameters receive
only copy k's gradient, so one Adam over the stacked leaves is m separate Adams:
Adam, its L2 weight decay and its moment estimates are all elementwise, and every
copy takes the same number of steps. BatchNorm running statistics are updated in
place on the stacked buffers, per copy, exactly as in m separate runs.

Why vmap and not hand-written grouped convolutions: vmap applies to every model of
the zoo without rewriting it (ResNets, MobileNet, VGG, ViT, the digits models), and
its batching rules already lower a convolution whose weight is batched to one
grouped convolution (``groups = m``) and a linear layer to one batched matmul, which
is what a grouped rewrite would produce. A model whose forward cannot be vmapped
(data-dependent Python control flow, ``.item()``) is detected once by a probe and
distilled sequentially, with the reason logged.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from takfl.stacking import stack_copies, vmapped_forward
from takfl.state import State

Precision = Literal["fp32", "bf16"]

log = logging.getLogger(__name__)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over the batch.

    Args:
        student: (B, C) logits with grad; teacher: (B, C) logits (no grad needed).
    Returns:
        a scalar; zero when the two logit tensors are equal.
    """
    t = temperature
    log_p_student = F.log_softmax(student / t, dim=1)
    log_p_teacher = F.log_softmax(teacher / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * t * t


Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""f(student_logits (B, K), batch_indices (B,)) -> scalar loss."""


@dataclass(frozen=True, kw_only=True)
class DistillSettings:
    steps: int = 0  # optimiser steps (used when ``epochs`` is None)
    epochs: int | None = None  # passes over the shuffled public set; overrides ``steps``
    batch_size: int = 64
    learning_rate: float = 1e-3  # Adam
    weight_decay: float = 0.0  # Adam's L2 penalty, as the reference code sets it
    # bf16: forward under torch.autocast (fp32 master weights, fp32 loss); fp32: none
    precision: Precision = "fp32"
    compile: bool = False  # torch.compile the (batched) forward

    def total_steps(self, n: int) -> int:
        """Optimiser steps for a public set of ``n`` samples."""
        if self.epochs is None:
            return self.steps
        return self.epochs * math.ceil(n / self.batch_size)


@dataclass(frozen=True, kw_only=True)
class EarlyStopping:
    """Best-checkpoint selection on labelled validation (FedDF's official code).

    ``score(model) -> float`` (higher is better) is called on the starting model and
    every ``every`` steps; training stops after ``patience`` steps without a better
    score, and the best checkpoint seen (the start included) is returned.
    """

    score: Callable[[nn.Module], float]
    every: int = 20
    patience: int = 100


def takfl_objective(
    teacher_logits: torch.Tensor,
    self_logits: torch.Tensor | None,
    temperature: float,
    self_reg_weight: float = 0.0,
    self_reg_temperature: float = 20.0,
) -> Objective:
    """TAKFL's loss for one (student, teacher) pair.

    Args:
        teacher_logits: (N, K) Z_i, the teacher prototype's mean client logits.
        self_logits: (N, K) S_avg_j, the student's own starting logits (None: no self-reg).
    """
    use_self = self_logits is not None and self_reg_weight > 0

    def objective(s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = kd_loss(s, teacher_logits[idx], temperature)
        if use_self and self_logits is not None:
            loss = loss + self_reg_weight * kd_loss(s, self_logits[idx], self_reg_temperature)
        return loss

    return objective


BatchedObjective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""f(student_logits (m, B, K), batch_indices (B,)) -> scalar: the sum over the m
copies of each copy's own loss."""


def kd_loss_stacked(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Sum over copies of :func:`kd_loss` (each a batch mean).

    Args:
        student: (m, B, K) logits; teacher: (m, B, K), or (B, K) shared by every copy.
    """
    t = temperature
    log_p_student = F.log_softmax(student / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher / t, dim=-1).expand_as(log_p_student)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="sum", log_target=True)
    return kl * (t * t / student.shape[1])


def takfl_objective_stacked(
    teacher_logits: torch.Tensor,
    self_logits: torch.Tensor | None,
    temperature: float,
    self_reg_weight: float = 0.0,
    self_reg_temperature: float = 20.0,
) -> BatchedObjective:
    """TAKFL's loss for one student and m teachers at once: copy k's term is
    :func:`takfl_objective` with teacher k.

    Args:
        teacher_logits: (m, N, K) the m teachers' Z_i, stacked.
        self_logits: (N, K) S_avg_j (None: no self-reg).
    """
    use_self = self_logits is not None and self_reg_weight > 0

    def objective(s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = kd_loss_stacked(s, teacher_logits[:, idx], temperature)
        if use_self and self_logits is not None:
            loss = loss + self_reg_weight * kd_loss_stacked(
                s, self_logits[idx], self_reg_temperature
            )
        return loss

    return objective


def batch_indices(n: int, settings: DistillSettings, seed: int) -> Iterator[torch.Tensor]:
    """The batch sequence of one distillation: epochs of shuffled passes (the reference's
    DataLoader with shuffle), or ``steps`` batches drawn with replacement."""
    gen = torch.Generator().manual_seed(seed)
    b = min(settings.batch_size, n)
    if settings.epochs is None:
        for _ in range(settings.steps):
            yield torch.randint(0, n, (b,), generator=gen)
        return
    for _ in range(settings.epochs):
        perm = torch.randperm(n, generator=gen)
        yield from perm.split(settings.batch_size)


def device_batches(
    n: int, settings: DistillSettings, seed: int, device: torch.device
) -> list[torch.Tensor]:
    """:func:`batch_indices` drawn up front and moved to ``device`` in one copy, so the
    training loop issues no host-to-device transfer."""
    batches = list(batch_indices(n, settings, seed))
    if not batches:
        return []
    sizes = [len(b) for b in batches]
    return list(torch.cat(batches).to(device).split(sizes))


def _autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _cpu_state(model: nn.Module) -> State:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def distill(
    model: nn.Module,
    start: State,
    public_x: torch.Tensor,
    objective: Objective,
    settings: DistillSettings,
    *,
    seed: int,
    early_stopping: EarlyStopping | None = None,
) -> State:
    """Train ``model``, loaded with ``start``, on public inputs to minimise ``objective``.

    Args:
        model: a scratch module of the student's architecture, on the compute device.
        start: theta_avg_j; loaded before training, never modified.
        public_x: (N, ...) public inputs, already on the compute device.
        objective: the loss on a batch (see :data:`Objective`).
        seed: fixes the batch sequence, so every teacher of a student sees the same batches.
        early_stopping: when given, the best checkpoint on validation is returned.
    Returns:
        the distilled state dict theta_ij (CPU tensors).
    """
    model.load_state_dict(start)
    opt = torch.optim.Adam(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    best_score, best_state, best_step = -math.inf, None, 0
    if early_stopping is not None:
        best_score, best_state = early_stopping.score(model), _cpu_state(model)
    model.train()
    forward: Callable[[torch.Tensor], torch.Tensor] = model
    if settings.compile:
        forward = torch.compile(model)
    batches = device_batches(public_x.shape[0], settings, seed, public_x.device)
    for step, idx in enumerate(batches, start=1):
        with _autocast(public_x.device, settings.precision):
            logits = forward(public_x[idx])
        loss = objective(logits.float(), idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if early_stopping is not None and step % early_stopping.every == 0:
            score = early_stopping.score(model)
            model.train()
            if score > best_score:
                best_score, best_state, best_step = score, _cpu_state(model), step
            elif step - best_step >= early_stopping.patience:
                break
    if early_stopping is not None:
        score = early_stopping.score(model)
        if score > best_score:
            best_state = _cpu_state(model)
        model.train()
        if best_state is not None:
            return best_state
    return _cpu_state(model)


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
    """``copies`` distillations of ``model`` from the same ``start`` and batch sequence,
    in one vmapped pass per batch; equal (within float rounding) to ``copies`` calls of
    :func:`distill` with the per-copy objectives that ``objective`` sums.

    The stacked parameters are the optimiser's leaves, shape (copies, *p.shape); one
    Adam over them equals one Adam per copy, since Adam and its weight decay act
    elementwise. The loop holds no host synchronisation: batch indices are on the
    device beforehand and the loss is never read back.

    Args:
        model: a scratch module of the student's architecture; used as a function
            only (its own tensors are not changed).
        start: theta_avg_j, never modified.
        public_x: (N, ...) public inputs, on the compute device.
        objective: see :data:`BatchedObjective`.
        seed: fixes the batch sequence shared by every copy.
    Returns:
        per copy, the distilled state dict (CPU tensors, ``start``'s keys).
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
    model.train()
    forward = vmapped_forward(model, shared_input=True)
    if settings.compile:
        forward = torch.compile(forward)
    for idx in device_batches(public_x.shape[0], settings, seed, device):
        with _autocast(device, settings.precision):
            logits = forward(params, buffers, public_x[idx])
        loss = objective(logits.float(), idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.train(was_training)
    stacked = {**params, **buffers}
    return [{k: stacked[k][c].detach().to("cpu").clone() for k in start} for c in range(copies)]
