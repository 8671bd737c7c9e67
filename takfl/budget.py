"""The distillation budget of one server step: its cap, and the rule that may stop each
distillation before it.

Every distilling method (TAKFL's m distillations per student, FedDF's and FedET's one)
gets the same cap and, with ``distill.adaptive``, the same rule (:mod:`takfl.stopping`):
scored on its start and every ``check_every`` passes, stopped ``stop_patience`` passes
after its best score, its best checkpoint kept (a score equal to the best counts as
better: the later checkpoint is kept and the distillation goes on). The score is the student's top-1
accuracy on the labelled validation set when the run gives one; otherwise its agreement
with its own target on public samples held out from distillation (the same samples for
every method and student of a round). With a fixed budget every distillation runs the
whole cap, except that FedDF and FedET keep their published best checkpoint on
validation.

Pure: tensors in, a :class:`Budget` and info records out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from takfl.config.federation import DistillSpec
from takfl.distill import Distilled, DistillSettings
from takfl.stopping import EarlyStopping


def distill_settings(d: DistillSpec) -> DistillSettings:
    """The spec's optimiser settings and its budget in the unit that wins: epochs, else
    steps, else passes (DEFAULT_DISTILL_PASSES when the config names none)."""
    steps, passes = 0, None
    if d.epochs is None:
        steps, passes = (d.steps, None) if d.steps is not None else (0, d.passes)
    return DistillSettings(
        steps=steps,
        epochs=d.epochs,
        passes=passes,
        batch_size=d.batch_size,
        learning_rate=d.learning_rate,
        weight_decay=d.weight_decay,
        precision=d.precision,
        compile=d.compile,
    )


@dataclass(frozen=True, kw_only=True)
class Budget:
    """One round's budget, shared by every distillation of every method."""

    settings: DistillSettings  # the budget; the cap when adaptive
    cap: int  # optimiser steps one distillation may take
    pool: torch.Tensor | None  # public indices distillation draws from; None: all
    adaptive: bool
    every: int  # adaptive: steps between scores
    patience: int  # adaptive: steps without a better score before stopping
    val_x: torch.Tensor | None  # labelled validation, None when withheld
    val_y: torch.Tensor | None
    holdout: torch.Tensor | None  # public indices scored when validation is withheld
    public_x: torch.Tensor
    published: EarlyStopping | None  # fixed budget: FedDF's checkpoint rule on validation

    @property
    def scored_samples(self) -> int:
        """Samples one score of a distillation reads (validation, else held out)."""
        if self.val_x is not None:
            return len(self.val_x)
        return 0 if self.holdout is None else len(self.holdout)

    def rule(self, targets: torch.Tensor) -> EarlyStopping | None:
        """The adaptive rule for distillations toward ``targets``: the labels each one's
        target gives the whole public set, (N,) or (copies, N). None: fixed budget."""
        if not self.adaptive:
            return None
        if self.val_x is not None and self.val_y is not None:
            return EarlyStopping(
                x=self.val_x,
                labels=self.val_y,
                every=self.every,
                patience=self.patience,
                ties_improve=True,
            )
        if self.holdout is None:
            raise ValueError("an adaptive budget without validation needs held-out samples")
        hold = self.holdout.to(targets.device)
        return EarlyStopping(
            x=self.public_x[hold.to(self.public_x.device)],
            labels=targets[..., hold],
            every=self.every,
            patience=self.patience,
            ties_improve=True,
        )

    def baseline_rule(self, targets: torch.Tensor) -> EarlyStopping | None:
        """FedDF's and FedET's rule: the adaptive one, or with a fixed budget their
        published best checkpoint on validation (None without validation)."""
        return self.rule(targets) if self.adaptive else self.published


def plan_budget(
    spec: DistillSpec,
    public_x: torch.Tensor,
    val_x: torch.Tensor | None,
    val_y: torch.Tensor | None,
    *,
    seed: int,
) -> Budget:
    """The round's budget from the spec. ``val_x``/``val_y`` None (or empty): validation
    withheld; an adaptive budget then holds out ceil(holdout x N) public samples (chosen
    by ``seed``) from distillation to score agreement on."""
    settings = distill_settings(spec)
    n = len(public_x)
    has_val = val_x is not None and val_y is not None and len(val_x) > 0
    holdout = pool = None
    if spec.adaptive and not has_val:
        if n < 2:
            raise ValueError("an adaptive budget without validation needs 2+ public samples")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        k = min(n - 1, max(1, math.ceil(spec.holdout * n)))
        holdout, pool = order[:k].sort().values, order[k:].sort().values
    drawn = n if pool is None else len(pool)
    per_pass = math.ceil(drawn / settings.batch_size)
    published = None
    if has_val and val_x is not None and val_y is not None:
        published = EarlyStopping(
            x=val_x, labels=val_y, every=spec.eval_every, patience=spec.patience
        )
    return Budget(
        settings=settings,
        cap=settings.total_steps(drawn),
        pool=pool,
        adaptive=spec.adaptive,
        every=max(1, round(spec.check_every * per_pass)),
        patience=max(1, round(spec.stop_patience * per_pass)),
        val_x=val_x if has_val else None,
        val_y=val_y if has_val else None,
        holdout=holdout,
        public_x=public_x,
        published=published,
    )


def steps_info(runs: list[Distilled], cap: int, names: list[str] | None) -> dict[str, float]:
    """Metrics info of a student's distillations: the cap, and per distillation the steps
    it trained and the step of the checkpoint it kept; ``names`` (TAKFL: the teachers)
    suffix the keys, None for a single distillation."""
    info: dict[str, float] = {"distill_cap": float(cap)}
    for i, run in enumerate(runs):
        key = "" if names is None else f"/{names[i]}"
        info[f"distill_steps{key}"] = float(run.steps)
        info[f"distill_best{key}"] = float(run.best_step)
    return info


def distill_gflop(
    runs: list[Distilled],
    *,
    forward_flops: int,
    batch: int,
    scored: int,
    batched: bool,
    extra_forwards: int = 0,
) -> float:
    """Estimated GFLOP of a student's distillations: 3 forwards per trained sample
    (forward and backward), one per scored sample, ``extra_forwards`` more (TAKFL's self
    logits). Batched copies all run until the last one stopped, and are all scored.

    Args:
        forward_flops: FLOPs of one forward of the student on one sample.
        batch: samples per step; scored: samples per score (validation or held out).
    """
    if batched and runs:
        trained = max(r.steps for r in runs) * len(runs)
        scores = max(len(r.scores) for r in runs) * len(runs)
    else:
        trained = sum(r.steps for r in runs)
        scores = sum(len(r.scores) for r in runs)
    forwards = 3 * trained * batch + scores * scored + extra_forwards
    return forwards * forward_flops / 1e9
