"""Knowledge distillation with KD self-regularisation (TAKFL step 5).

For student j and teacher i, starting from theta_avg_j, minimise over public x:

    L = T^2  KL(softmax(Z_i/T)     || softmax(s/T))
      + gamma Ts^2 KL(softmax(S_avg_j/Ts) || softmax(s/Ts))

where s are the student's logits, Z_i the teacher ensemble's mean logits and
S_avg_j the logits of theta_avg_j itself (computed once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

State = dict[str, torch.Tensor]


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
    for step, batch in enumerate(batch_indices(public_x.shape[0], settings, seed), start=1):
        idx = batch.to(public_x.device)
        loss = objective(model(public_x[idx]), idx)
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
