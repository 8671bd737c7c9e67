"""The merge-coefficient (lambda) strategies of TAKFL step 6, each a registered unit.

A strategy gets one student's task vectors (through a :class:`MergeScorer`) and
returns coefficients on the simplex, one per teacher that reported this round.
Each unit records its name, where it comes from and whether it needs the
labelled validation set; :func:`resolve_lambda_strategy` is the only lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from takfl.config.federation import LambdaSpec
from takfl.method_names import LAMBDA_STRATEGIES, lookup, registry
from takfl.task_arithmetic import (
    MergeScorer,
    best_on_validation,
    optimise_on_simplex,
    prediction_entropy,
    simplex_candidates,
)


@dataclass(frozen=True, kw_only=True)
class LambdaContext:
    """What a strategy may look at for one student."""

    scorer: MergeScorer
    spec: LambdaSpec
    student: int  # the student's index in the config's prototype order
    teachers: list[int]  # config indices of the teachers behind the task vectors, in order
    public_x: torch.Tensor  # unlabelled public inputs
    val_x: torch.Tensor | None  # labelled validation, None when withheld
    val_y: torch.Tensor | None
    seed: int


@dataclass(frozen=True)
class LambdaChoice:
    lambdas: torch.Tensor  # (m,) on the simplex, one per teacher in ``LambdaContext.teachers``
    info: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class LambdaStrategy:
    name: str
    reference: str
    needs_validation: bool
    choose: Callable[[LambdaContext], LambdaChoice]


def _validation(ctx: LambdaContext) -> tuple[torch.Tensor, torch.Tensor]:
    if ctx.val_x is None or ctx.val_y is None or len(ctx.val_x) == 0:
        raise ValueError(f"lambda strategy needs a labelled validation set (student {ctx.student})")
    return ctx.val_x, ctx.val_y


def fixed_row(row: list[float], teachers: list[int]) -> torch.Tensor:
    """The configured row restricted to the reporting teachers, renormalised to sum 1.

    Negative entries are refused; a row whose reporting entries sum to 0 gives
    uniform weights over the reporting teachers.
    """
    if any(v < 0 for v in row):
        raise ValueError(f"fixed lambda rows must be non-negative, got {row}")
    kept = torch.tensor([row[i] for i in teachers], dtype=torch.float32)
    total = float(kept.sum())
    if total <= 0:
        return torch.full((len(teachers),), 1.0 / len(teachers))
    return kept / total


def _fixed(ctx: LambdaContext) -> LambdaChoice:
    if ctx.spec.matrix is None:
        raise ValueError("lambda strategy 'fixed' needs algorithm.lambdas.matrix")
    return LambdaChoice(fixed_row(ctx.spec.matrix[ctx.student], ctx.teachers))


def heuristic_candidates(m: int, per_exponent: int, order: str, seed: int) -> list[torch.Tensor]:
    """The reference code's candidates: uniform, then for e in (1, 5, 10) ``per_exponent``
    draws of Beta(1, 100)^e per coordinate, each normalised to sum 1.

    ``order="ascending"`` sorts each draw before normalising, as the reference does,
    so the last teacher always gets the largest weight; ``"unsorted"`` does not.
    """
    rng = np.random.default_rng(seed)
    out = [torch.full((m,), 1.0 / m)]
    for exponent in (1, 5, 10):
        for _ in range(per_exponent):
            draw = rng.beta(1.0, 100.0, size=m) ** exponent
            if order == "ascending":
                draw = np.sort(draw)
            draw = draw / max(float(draw.sum()), 1e-300)
            out.append(torch.tensor(draw, dtype=torch.float32))
    return out


def _heuristic(ctx: LambdaContext) -> LambdaChoice:
    val_x, val_y = _validation(ctx)
    spec = ctx.spec
    cands = heuristic_candidates(
        ctx.scorer.m, spec.candidates_per_exponent, spec.heuristic_order, ctx.seed
    )
    i, acc, loss = best_on_validation(ctx.scorer, cands, val_x, val_y)
    return LambdaChoice(cands[i], {"val_accuracy": acc * 100.0, "val_loss": loss})


def _search(ctx: LambdaContext) -> LambdaChoice:
    val_x, val_y = _validation(ctx)
    cands = list(simplex_candidates(ctx.scorer.m, ctx.spec.search_candidates, ctx.seed))
    i, acc, loss = best_on_validation(ctx.scorer, cands, val_x, val_y)
    return LambdaChoice(cands[i], {"val_accuracy": acc * 100.0, "val_loss": loss})


def _learned(ctx: LambdaContext) -> LambdaChoice:
    val_x, val_y = _validation(ctx)
    lam, loss = optimise_on_simplex(
        ctx.scorer,
        lambda out, y: F.cross_entropy(out, y),
        val_x,
        val_y,
        ctx.spec.learn_steps,
        ctx.spec.learn_rate,
        ctx.seed,
    )
    return LambdaChoice(lam, {"val_loss": loss})


def _unsupervised(ctx: LambdaContext) -> LambdaChoice:
    lam, ent = optimise_on_simplex(
        ctx.scorer,
        lambda out, _: prediction_entropy(out),
        ctx.public_x,
        None,
        ctx.spec.learn_steps,
        ctx.spec.learn_rate,
        ctx.seed,
    )
    return LambdaChoice(lam, {"public_entropy": ent})


_REGISTRY: dict[str, LambdaStrategy] = registry(
    "lambda strategy",
    LAMBDA_STRATEGIES,
    (
        LambdaStrategy(
            name="heuristic",
            reference="TAKFL reference code (hojinchangucsd/TAKFL, main_fedhd.heuristic): "
            "uniform and Beta(1,100)^e candidates scored on validation",
            needs_validation=True,
            choose=_heuristic,
        ),
        LambdaStrategy(
            name="fixed",
            reference="TAKFL (arXiv 2409.18461) with given task weights (run.sh TASK_WEIGHTS)",
            needs_validation=False,
            choose=_fixed,
        ),
        LambdaStrategy(
            name="search",
            reference="simplex vertices, centre and Dirichlet(1) draws scored on validation",
            needs_validation=True,
            choose=_search,
        ),
        LambdaStrategy(
            name="learned",
            reference="TAKFL reference code (tune_lambda.py): softmax coefficients trained "
            "on validation cross-entropy",
            needs_validation=True,
            choose=_learned,
        ),
        LambdaStrategy(
            name="unsupervised",
            reference="AdaMerging (Yang et al., ICLR 2024): minimise prediction entropy "
            "on unlabelled data",
            needs_validation=False,
            choose=_unsupervised,
        ),
    ),
    lambda unit: unit.name,
)


def lambda_strategies() -> dict[str, LambdaStrategy]:
    return dict(_REGISTRY)


def resolve_lambda_strategy(name: str) -> LambdaStrategy:
    """The registered strategy ``name``; an unknown name is a ValueError listing the known."""
    return lookup("lambda strategy", _REGISTRY, name)
