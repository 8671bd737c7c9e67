"""When a distillation stops, and which of its checkpoints it keeps.

A distillation under :class:`EarlyStopping` is scored on its start and every ``every``
optimiser steps: the top-1 agreement of the student's eval-mode predictions on ``x``
with ``labels``, which are the labelled validation set's labels (FedDF's official code
selects checkpoints on validation accuracy) or, without validation, the labels its own
target gives held-out public samples. It stops after ``patience`` steps without a
better score and keeps its best checkpoint, the start included. With ``ties_improve`` a
score equal to the best counts as better (the later checkpoint is kept and patience
restarts): on a small validation set plateaus of equal accuracy are common, and a
distillation on one keeps going; without it (FedDF's rule) only a strictly better score
does.

Copies distilled together (one student, m teachers, batched) are tracked one by one
by a :class:`Tracker`: a copy that stopped is no longer scored and its best checkpoint
is frozen; the batch ends when every copy stopped or the cap is reached. Copies never
interact (each has its own Adam), so a copy's best checkpoint and its stopping step are
the ones it would have had alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, kw_only=True)
class EarlyStopping:
    """Score, patience and best-checkpoint selection of a distillation (see module)."""

    x: torch.Tensor  # (V, ...) inputs, on the compute device
    labels: torch.Tensor  # (V,) shared by every copy, or (copies, V): one row per copy
    every: int = 20  # optimiser steps between two scores
    patience: int = 100  # steps without a better score before stopping
    ties_improve: bool = False  # a score equal to the best counts as better

    def __post_init__(self) -> None:
        if self.every < 1 or self.patience < 1:
            raise ValueError(f"every and patience must be >= 1, got {self.every}, {self.patience}")
        if self.labels.ndim not in (1, 2) or self.labels.shape[-1] != len(self.x):
            raise ValueError(
                f"labels must be (V,) or (copies, V) with V = {len(self.x)}, "
                f"got {tuple(self.labels.shape)}"
            )

    def labels_of(self, copy: int) -> torch.Tensor:
        """(V,) the labels copy ``copy`` is scored against."""
        return self.labels if self.labels.ndim == 1 else self.labels[copy]


def agreement(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 agreement per copy.

    Args:
        logits: (V, K) or (copies, V, K). labels: (V,) or (copies, V).
    Returns:
        () or (copies,): the fraction of samples whose argmax equals the label.
    """
    return (logits.argmax(-1) == labels).float().mean(-1)


@dataclass(kw_only=True)
class Tracker:
    """Per copy: the best score so far, the step it was reached at, and the step the copy
    stopped at (None while it runs)."""

    copies: int
    patience: int
    ties_improve: bool = False
    best: list[float] = field(init=False)
    best_step: list[int] = field(init=False)
    stopped: list[int | None] = field(init=False)
    history: list[list[tuple[int, float]]] = field(init=False)

    def __post_init__(self) -> None:
        self.best = [-math.inf] * self.copies
        self.best_step = [0] * self.copies
        self.stopped = [None] * self.copies
        self.history = [[] for _ in range(self.copies)]

    def active(self) -> list[int]:
        return [c for c in range(self.copies) if self.stopped[c] is None]

    @property
    def done(self) -> bool:
        return all(s is not None for s in self.stopped)

    def observe(self, step: int, scores: list[float]) -> list[int]:
        """Record the running copies' ``scores`` (one per copy) at ``step``; stop those
        ``patience`` steps past their best. Returns the copies that improved: their
        checkpoint at ``step`` is their new best and must be kept."""
        if len(scores) != self.copies:
            raise ValueError(f"{len(scores)} scores for {self.copies} copies")
        improved = []
        for c in self.active():
            self.history[c].append((step, scores[c]))
            if scores[c] > self.best[c] or (self.ties_improve and scores[c] == self.best[c]):
                self.best[c], self.best_step[c] = scores[c], step
                improved.append(c)
            elif step - self.best_step[c] >= self.patience:
                self.stopped[c] = step
        return improved

    def steps_trained(self, copy: int, ran: int) -> int:
        """Optimiser steps copy ``copy`` trained for when the loop ran ``ran`` steps."""
        stopped = self.stopped[copy]
        return ran if stopped is None else min(stopped, ran)
