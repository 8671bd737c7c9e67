"""Resource limits a device profile asks for, applied to the agent process."""

from __future__ import annotations

import logging
import os

import torch

from takfl.config.profile import TrainingSpec

log = logging.getLogger(__name__)


def apply_limits(spec: TrainingSpec) -> dict[str, object]:
    """Set torch's thread count and, where the OS allows, cap the address space.

    Returns what was applied, for the agent's status line.
    """
    applied: dict[str, object] = {}
    torch.set_num_threads(spec.threads)
    applied["threads"] = spec.threads
    if spec.memory_limit_mb is not None:
        try:
            import resource

            limit = spec.memory_limit_mb * 1024 * 1024
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
            applied["memory_limit_mb"] = spec.memory_limit_mb
        except (ImportError, ValueError, OSError) as e:  # not on this OS, or not allowed
            log.warning("could not cap memory at %d MB: %s", spec.memory_limit_mb, e)
    applied["pid"] = os.getpid()
    return applied


def effective_training(profile: TrainingSpec, dictated: TrainingSpec | None) -> TrainingSpec:
    """The coordinator decides epochs, batch, optimiser and learning rate; the device
    keeps its own threads, memory cap and time budget."""
    if dictated is None:
        return profile
    return dictated.model_copy(update={
        "threads": profile.threads,
        "memory_limit_mb": profile.memory_limit_mb,
        "time_budget_s": profile.time_budget_s,
    })
