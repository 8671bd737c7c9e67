"""Resource limits a device profile asks for, applied to the agent process."""

from __future__ import annotations

import logging

import torch

from edge_agent.memory import peak_rss_mb
from takfl.config.profile import TrainingSpec

log = logging.getLogger(__name__)


def apply_limits(spec: TrainingSpec) -> dict[str, object]:
    """Set torch's thread count; return what applies, for the agent's status line.

    The memory limit is not enforced with ``RLIMIT_AS``: torch reserves far more
    address space than it touches, so such a cap breaks thread creation long
    before memory is short. The agent checks its peak resident size after each
    task instead (:func:`peak_rss_mb`), and a hard cap belongs to the service
    manager (systemd ``MemoryMax=``, see firmware_notes/).
    """
    torch.set_num_threads(spec.threads)
    applied: dict[str, object] = {"threads": spec.threads}
    if spec.memory_limit_mb is not None:
        applied["memory_limit_mb"] = spec.memory_limit_mb
    if spec.time_budget_s is not None:
        applied["time_budget_s"] = spec.time_budget_s
    return applied


def over_memory(spec: TrainingSpec) -> str | None:
    """A warning when the peak resident size exceeded the profile's limit, else None."""
    peak = peak_rss_mb()
    if spec.memory_limit_mb is None or peak is None or peak <= spec.memory_limit_mb:
        return None
    return (
        f"peak memory {peak:.0f} MB exceeded the profile's {spec.memory_limit_mb} MB; "
        "lower the batch size or choose a smaller model for this tier"
    )
