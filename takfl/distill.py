"""Knowledge distillation with KD self-regularisation (TAKFL step 5).

For student j and teacher i, starting from theta_avg_j, minimise over public x:

    L = T^2  KL(softmax(Z_i/T)     || softmax(s/T))
      + gamma Ts^2 KL(softmax(S_avg_j/Ts) || softmax(s/Ts))

where s are the student's logits, Z_i the teacher ensemble's mean logits and
S_avg_j the logits of theta_avg_j itself (computed once).
"""

from __future__ import annotations

from collections.abc import Callable
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


def soft_target_loss(
    student: torch.Tensor, target_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(p || softmax(student/T)) for a target given as probabilities p (B, C)."""
    t = temperature
    log_p_student = F.log_softmax(student / t, dim=1)
    kl = F.kl_div(log_p_student, target_probs.clamp_min(1e-12), reduction="batchmean")
    return kl * t * t


Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""f(student_logits (B, K), batch_indices (B,)) -> scalar loss."""


@dataclass(frozen=True)
class DistillSettings:
    steps: int  # optimiser steps
    batch_size: int
    learning_rate: float  # Adam


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


def distill(
    model: nn.Module,
    start: State,
    public_x: torch.Tensor,
    objective: Objective,
    settings: DistillSettings,
    *,
    seed: int,
) -> State:
    """Train ``model``, loaded with ``start``, on public inputs to minimise ``objective``.

    Args:
        model: a scratch module of the student's architecture, on the compute device.
        start: theta_avg_j; loaded before training, never modified.
        public_x: (N, C, H, W) public inputs, already on the compute device.
        objective: the loss on a batch (see :data:`Objective`).
        seed: fixes the batch sequence, so every teacher of a student sees the same batches.
    Returns:
        the distilled state dict theta_ij (CPU tensors).
    """
    model.load_state_dict(start)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    gen = torch.Generator().manual_seed(seed)
    n = public_x.shape[0]
    for _ in range(settings.steps):
        idx = torch.randint(0, n, (min(settings.batch_size, n),), generator=gen)
        idx = idx.to(public_x.device)
        loss = objective(model(public_x[idx]), idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
