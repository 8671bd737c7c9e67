"""Targets of the baselines that share TAKFL's code path.

FedDF (Lin et al. 2020): one target for every student, the mean logits of all
clients of all prototypes. FedET (Cho et al. 2022): a variance-weighted
ensemble of client predictions plus a diversity term toward the clients that
disagree with the ensemble.
"""

from __future__ import annotations

import torch

from takfl.distill import Objective, kd_loss, soft_target_loss


def feddf_target(mean_logits: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """Mean of all clients' logits, from each prototype's mean and client count.

    Args:
        mean_logits: per prototype (N, K) mean client logits. counts: clients behind each.
    Returns:
        (N, K): sum_j counts_j * Z_j / sum_j counts_j.
    """
    if not mean_logits or sum(counts) <= 0:
        raise ValueError("FedDF needs at least one client's logits")
    total = torch.zeros_like(mean_logits[0], dtype=torch.float64)
    for z, c in zip(mean_logits, counts, strict=True):
        total += z.to(torch.float64) * c
    return (total / sum(counts)).to(torch.float32)


def feddf_objective(target_logits: torch.Tensor, temperature: float) -> Objective:
    def objective(s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return kd_loss(s, target_logits[idx], temperature)

    return objective


def fedet_targets(
    client_logits: list[torch.Tensor], temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FedET's ensemble target and diversity target.

    Each client k's softened prediction p_k = softmax(z_k / T) (N, K) is weighted
    per sample by its confidence, the variance of p_k over classes.

    Returns:
        target (N, K) probabilities sum_k w_k p_k / sum_k w_k;
        diverse (N, K) mean prediction of the clients whose top-1 differs from
        the target's (zeros where all agree);
        has_diverse (N,) bool, where at least one client disagrees.
    """
    if not client_logits:
        raise ValueError("FedET needs at least one client's logits")
    probs = torch.stack([torch.softmax(z.float() / temperature, dim=1) for z in client_logits])
    weights = probs.var(dim=2, unbiased=False) + 1e-12  # (clients, N)
    target = (weights.unsqueeze(2) * probs).sum(0) / weights.sum(0).unsqueeze(1)
    disagree = probs.argmax(2) != target.argmax(1).unsqueeze(0)  # (clients, N)
    n_dis = disagree.sum(0)  # (N,)
    diverse = (disagree.unsqueeze(2) * probs).sum(0) / n_dis.clamp_min(1).unsqueeze(1)
    return target, diverse, n_dis > 0


def fedet_objective(
    target: torch.Tensor,
    diverse: torch.Tensor,
    has_diverse: torch.Tensor,
    temperature: float,
    diversity_weight: float,
) -> Objective:
    """KD to the variance-weighted ensemble + diversity_weight * KD to the dissenters."""

    def objective(s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = soft_target_loss(s, target[idx], temperature)
        mask = has_diverse[idx]
        if diversity_weight > 0 and bool(mask.any()):
            loss = loss + diversity_weight * soft_target_loss(
                s[mask], diverse[idx][mask], temperature
            )
        return loss

    return objective
