"""Knowledge distillation with KD self-regularisation (TAKFL step 5).

For student j and teacher i, starting from theta_avg_j, minimise over public x:

    L = T^2  KL(softmax(Z_i/T)     || softmax(s/T))
      + gamma Ts^2 KL(softmax(S_avg_j/Ts) || softmax(s/Ts))

where s are the student's logits, Z_i the teacher ensemble's mean logits and
S_avg_j the logits of theta_avg_j itself (computed once).

Each distillation trains for the budget (:class:`DistillSettings`: steps, epochs or
passes over the public set) or, under an early-stopping rule (:mod:`takfl.stopping`),
until its student stops improving, the budget then its cap. A student's m
distillations can run together, vmapped (:mod:`takfl.distill_batched`).

Why vmap and not hand-written grouped convolutions: vmap applies to every model of
the zoo without rewriting it (ResNets, MobileNet, VGG, ViT, the digits models), and
its batching rules already lower a convolution whose weight is batched to one
grouped convolution (``groups = m``) and a linear layer to one batched matmul, which
is what a grouped rewrite would produce.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from takfl.state import State
from takfl.stopping import EarlyStopping, Tracker, agreement

Precision = Literal["fp32", "bf16"]


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
    # the budget, one unit of three (epochs, else passes, else steps)
    steps: int = 0  # optimiser steps
    epochs: int | None = None  # whole passes over the shuffled public set
    passes: float | None = None  # passes over the shuffled public set, fractions allowed
    batch_size: int = 64
    learning_rate: float = 1e-3  # Adam
    weight_decay: float = 0.0  # Adam's L2 penalty, as the reference code sets it
    # bf16: forward under torch.autocast (fp32 master weights, fp32 loss); fp32: none
    precision: Precision = "fp32"
    compile: bool = False  # torch.compile the (batched) forward

    def total_steps(self, n: int) -> int:
        """Optimiser steps for a public set of ``n`` samples: with ``passes``, that many
        passes of ceil(n / batch_size) batches, rounded up to a whole step."""
        per_pass = math.ceil(n / self.batch_size)
        if self.epochs is not None:
            return self.epochs * per_pass
        if self.passes is not None:
            return max(1, math.ceil(self.passes * per_pass - 1e-9))
        return self.steps


@dataclass(frozen=True, kw_only=True)
class Distilled:
    """One distillation's outcome."""

    state: State  # the kept checkpoint theta_ij (CPU tensors)
    steps: int  # optimiser steps it trained for (the cap, or fewer when it stopped early)
    best_step: int  # the step of the kept checkpoint (0: the start)
    scores: tuple[tuple[int, float], ...] = ()  # (step, score) of every score taken


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
    """The batch sequence of one distillation over samples 0..n-1: ``epochs`` shuffled
    passes (the reference's DataLoader with shuffle); else ``passes``, the same cut to its
    step count (a one-sample batch, which BatchNorm cannot train on, is left out); else
    ``steps`` batches drawn with replacement."""
    gen = torch.Generator().manual_seed(seed)
    if settings.epochs is not None:
        for _ in range(settings.epochs):
            yield from torch.randperm(n, generator=gen).split(settings.batch_size)
        return
    if settings.passes is None:
        b = min(settings.batch_size, n)
        for _ in range(settings.steps):
            yield torch.randint(0, n, (b,), generator=gen)
        return
    total, done = settings.total_steps(n), 0
    while done < total:
        for idx in torch.randperm(n, generator=gen).split(settings.batch_size):
            if len(idx) < 2 <= n:
                continue
            yield idx
            done += 1
            if done == total:
                return


def device_batches(
    n: int,
    settings: DistillSettings,
    seed: int,
    device: torch.device,
    pool: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """:func:`batch_indices` drawn up front and moved to ``device`` in one copy, so the
    training loop issues no host-to-device transfer. ``pool`` (P,): the public indices
    to draw from (None: all ``n``); the batches then index the whole public set."""
    if pool is not None:
        n = len(pool)
    batches = list(batch_indices(n, settings, seed))
    if not batches:
        return []
    sizes = [len(b) for b in batches]
    flat = torch.cat(batches)
    if pool is not None:
        flat = pool.to("cpu")[flat]
    return list(flat.to(device).split(sizes))


def precision_context(
    device: torch.device, precision: Precision
) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _cpu_state(model: nn.Module) -> State:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def _score(model: nn.Module, stop: EarlyStopping) -> float:
    """Agreement of ``model`` (eval mode, left in train mode) with the stop rule's labels."""
    model.eval()
    logits = torch.cat([model(stop.x[i : i + 512]) for i in range(0, len(stop.x), 512)])
    model.train()
    return float(agreement(logits.float(), stop.labels_of(0)))


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
    """The state of :func:`run_distillation` (see there)."""
    return run_distillation(
        model, start, public_x, objective, settings, seed=seed, early_stopping=early_stopping
    ).state


def run_distillation(
    model: nn.Module,
    start: State,
    public_x: torch.Tensor,
    objective: Objective,
    settings: DistillSettings,
    *,
    seed: int,
    early_stopping: EarlyStopping | None = None,
    pool: torch.Tensor | None = None,
) -> Distilled:
    """Train ``model``, loaded with ``start``, on public inputs to minimise ``objective``.

    Args:
        model: a scratch module of the student's architecture, on the compute device.
        start: theta_avg_j; loaded before training, never modified.
        public_x: (N, ...) public inputs, already on the compute device.
        objective: the loss on a batch (see :data:`Objective`).
        seed: fixes the batch sequence, so every teacher of a student sees the same batches.
        early_stopping: when given, training stops on it and its best checkpoint is kept
            (:mod:`takfl.stopping`); ``settings`` is then the cap.
        pool: (P,) the public indices batches are drawn from (None: all N).
    Returns:
        the distilled state dict theta_ij (CPU tensors), with the steps it took.
    """
    model.load_state_dict(start)
    opt = torch.optim.Adam(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    stop, tracker, best = early_stopping, None, None
    if stop is not None:
        tracker = Tracker(copies=1, patience=stop.patience, ties_improve=stop.ties_improve)
        tracker.observe(0, [_score(model, stop)])
        best = _cpu_state(model)
    model.train()
    forward: Callable[[torch.Tensor], torch.Tensor] = model
    if settings.compile:
        forward = torch.compile(model)
    ran = 0
    for idx in device_batches(public_x.shape[0], settings, seed, public_x.device, pool):
        with precision_context(public_x.device, settings.precision):
            logits = forward(public_x[idx])
        loss = objective(logits.float(), idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ran += 1
        if stop is not None and tracker is not None and ran % stop.every == 0:
            if tracker.observe(ran, [_score(model, stop)]):
                best = _cpu_state(model)
            if tracker.done:
                break
    if tracker is None or best is None or stop is None:
        return Distilled(state=_cpu_state(model), steps=ran, best_step=ran)
    if ran % stop.every != 0 and tracker.observe(ran, [_score(model, stop)]):
        best = _cpu_state(model)
    return Distilled(
        state=best,
        steps=tracker.steps_trained(0, ran),
        best_step=tracker.best_step[0],
        scores=tuple(tracker.history[0]),
    )
