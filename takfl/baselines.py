"""Targets of the baselines that share TAKFL's code path.

FedDF (Lin et al. 2020): one target for every student, the mean logits of all
clients of all prototypes. FedET (Cho et al. 2022, "Heterogeneous Ensemble
Knowledge Transfer for Training Large Models in Federated Learning", IJCAI):
hard pseudo-labels from a confidence-weighted (logit-variance) consensus of
every client, plus a diversity term toward the weighted logits of the clients
that disagree with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from takfl.distill import Objective, kd_loss


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


def _variance_weighted(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample, the average of the masked clients' logits weighted by each one's
    confidence, the variance of its logit vector.

    Args:
        logits: (clients, N, K). mask: (clients, N) bool, which clients take part.
    Returns:
        (N, K); zeros where no client takes part.
    """
    w = logits.var(dim=2, unbiased=False) * mask  # (clients, N)
    total = w.sum(0)  # (N,)
    out = (w.unsqueeze(2) * logits).sum(0) / total.clamp_min(1e-12).unsqueeze(1)
    return torch.where((total > 0).unsqueeze(1), out, torch.zeros_like(out))


def fedet_targets(
    client_logits: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FedET's consensus label and diversity target (Cho et al. 2022, section 4).

    Each client's confidence on a sample is the variance of its logits; the
    consensus is the confidence-weighted average of all clients' logits and its
    top-1 class the pseudo-label. The diversity target is the confidence-weighted
    average of the logits of the clients whose top-1 differs from that label.

    Args:
        client_logits: per client (N, K) logits on the public set.
    Returns:
        labels (N,) int64 pseudo-labels; diverse (N, K) logits (zeros where all
        agree); has_diverse (N,) bool, where at least one client disagrees.
    """
    if not client_logits:
        raise ValueError("FedET needs at least one client's logits")
    z = torch.stack([c.float() for c in client_logits])  # (clients, N, K)
    every = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
    labels = _variance_weighted(z, every).argmax(1)
    dissent = z.argmax(2) != labels.unsqueeze(0)  # (clients, N)
    return labels, _variance_weighted(z, dissent), dissent.any(0)


def fedet_objective(
    labels: torch.Tensor,
    diverse: torch.Tensor,
    has_diverse: torch.Tensor,
    temperature: float,
    diversity_weight: float,
) -> Objective:
    """Cross-entropy to the consensus label + diversity_weight * T^2 KL to the dissenters'
    softened logits, on the samples that have dissenters."""

    def objective(s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(s, labels[idx])
        mask = has_diverse[idx]
        if diversity_weight > 0 and bool(mask.any()):
            loss = loss + diversity_weight * kd_loss(s[mask], diverse[idx][mask], temperature)
        return loss

    return objective
