"""One server step after aggregation: distillation and merging, per algorithm.

Pure: modules, tensors and state dicts in; state dicts, coefficients and
timings out. The round engine (coordinator) and the benchmarks call
:func:`server_step` with an algorithm resolved once by :mod:`takfl.algorithms`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from takfl.baselines import feddf_objective, feddf_target, fedet_objective, fedet_targets
from takfl.budget import Budget, distill_gflop, plan_budget, steps_info
from takfl.budget import distill_settings as spec_settings
from takfl.config.federation import AlgorithmSpec
from takfl.distill import (
    Distilled,
    DistillSettings,
    Objective,
    run_distillation,
    takfl_objective,
    takfl_objective_stacked,
)
from takfl.distill_batched import (
    batched_pays,
    forward_flops_per_sample,
    run_distillations_batched,
    vmap_unsupported,
)
from takfl.lambdas import LambdaContext
from takfl.state import State
from takfl.task_arithmetic import MergeScorer, best_on_validation, merge, task_vector
from takfl.training import predict_logits

if TYPE_CHECKING:
    from takfl.algorithms import Algorithm

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PrototypeInput:
    """What the server knows of one prototype after the round's updates arrived."""

    name: str
    model: nn.Module  # scratch module of this architecture, on the compute device
    avg_state: State  # theta_avg_j (the previous global if no client returned)
    mean_logits: torch.Tensor | None  # Z_j (N, K) on the compute device; None: no clients
    num_clients: int  # clients behind mean_logits
    client_logits: list[torch.Tensor] = field(default_factory=list)  # per client, FedET only


@dataclass
class StepOutput:
    state: State  # the prototype's new global model (CPU)
    lambdas: dict[str, float] | None  # teacher name -> coefficient (TAKFL only)
    info: dict[str, float] = field(default_factory=dict)


@dataclass
class StepData:
    """The data a server step uses, as tensors on the compute device: ``public_x``
    unlabelled (distillation); validation labelled, None when the run withholds it
    from every method."""

    public_x: torch.Tensor
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    @property
    def has_validation(self) -> bool:
        return self.val_x is not None and self.val_y is not None and len(self.val_x) > 0


def distill_settings(spec: AlgorithmSpec) -> DistillSettings:
    """The algorithm's distillation settings and budget (:func:`takfl.budget.distill_settings`)."""
    return spec_settings(spec.distill)


def plan(algo: Algorithm, data: StepData, seed: int) -> Budget:
    """The round's budget for ``algo`` (the same for every method given the same spec)."""
    return plan_budget(algo.spec.distill, data.public_x, data.val_x, data.val_y, seed=seed)


def _add(timings: dict[str, float], key: str, since: float) -> float:
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + (now - since)
    return now


def fedavg_step(
    protos: list[PrototypeInput],
    data: StepData,
    algo: Algorithm,
    seed: int,
    timings: dict[str, float],
) -> dict[str, StepOutput]:
    """FedAvg within each prototype: nothing after aggregation."""
    return {p.name: StepOutput(p.avg_state, None) for p in protos}


def takfl_step(
    protos: list[PrototypeInput],
    data: StepData,
    algo: Algorithm,
    seed: int,
    timings: dict[str, float],
    *,
    self_reg: bool,
    scaled: bool,
    batched: bool | Literal["auto"] | None = None,
) -> dict[str, StepOutput]:
    """TAKFL: every student distils independently from every teacher, then merges with
    lambda on the simplex. ``scaled`` (ablation) also picks a task-vector scale on
    validation from the configured grid and records it in the info. ``batched``
    (default: the spec's ``distill.batched``) runs a student's distillations together
    (:mod:`takfl.distill_batched`) instead of one after another; ``"auto"`` decides per
    student (:func:`takfl.distill_batched.batched_pays`). The info records the budget
    each distillation used (:func:`takfl.budget.steps_info`) and its estimated GFLOP."""
    teachers = [(i, p) for i, p in enumerate(protos) if p.mean_logits is not None]
    if algo.lambda_strategy is None:
        raise ValueError(f"{algo.name} needs a lambda strategy")
    budget = plan(algo, data, seed)
    d = algo.spec.distill
    gamma = d.self_reg_weight if self_reg else 0.0
    if batched is None:
        batched = d.batched
    names = [t.name for _, t in teachers]
    out: dict[str, StepOutput] = {}
    for j, student in enumerate(protos):
        if not teachers:
            out[student.name] = StepOutput(student.avg_state, None)
            continue
        t0 = time.perf_counter()
        self_logits = None
        if gamma > 0:
            student.model.load_state_dict(student.avg_state)
            self_logits = predict_logits(student.model, data.public_x)
        targets = [t.mean_logits for _, t in teachers if t.mean_logits is not None]
        runs, together = _distill_all(
            student, targets, self_logits, data, budget, algo, gamma, seed * 1000 + j, batched
        )
        vectors = [task_vector(run.state, student.avg_state) for run in runs]
        t1 = _add(timings, "distill_s", t0)
        scorer = MergeScorer(student.model, student.avg_state, vectors, data.public_x.device)
        ctx = LambdaContext(
            scorer=scorer,
            spec=algo.spec.lambdas,
            student=j,
            teachers=[i for i, _ in teachers],
            public_x=data.public_x,
            val_x=data.val_x,
            val_y=data.val_y,
            seed=seed * 1000 + j,
        )
        choice = algo.lambda_strategy.choose(ctx)
        info = dict(choice.info)
        scale = 1.0
        if scaled:
            scale = choose_scale(scorer, choice.lambdas, algo.spec.lambdas.scale_grid, data)
            info["scale"] = scale
        state = merge(student.avg_state, vectors, choice.lambdas, scale)
        _add(timings, "merge_s", t1)
        info |= steps_info(runs, budget.cap, names)
        info["distill_gflop"] = _gflop(student, runs, budget, data, together, self_logits)
        lam = dict(zip(names, choice.lambdas.tolist(), strict=True))
        out[student.name] = StepOutput(state, lam, info)
    return out


def _gflop(
    student: PrototypeInput,
    runs: list[Distilled],
    budget: Budget,
    data: StepData,
    batched: bool,
    self_logits: torch.Tensor | None = None,
) -> float:
    """Estimated GFLOP of a student's distillations (:func:`takfl.budget.distill_gflop`)."""
    return distill_gflop(
        runs,
        forward_flops=forward_flops_per_sample(student.model, data.public_x),
        batch=min(budget.settings.batch_size, len(data.public_x)),
        scored=budget.scored_samples,
        batched=batched,
        extra_forwards=0 if self_logits is None else len(self_logits),
    )


def _distill_all(
    student: PrototypeInput,
    targets: list[torch.Tensor],
    self_logits: torch.Tensor | None,
    data: StepData,
    budget: Budget,
    algo: Algorithm,
    gamma: float,
    seed: int,
    batched: bool | Literal["auto"],
) -> tuple[list[Distilled], bool]:
    """theta_ij for every teacher target Z_i (N, K), batched when asked and possible;
    with whether they ran batched. Each stops on the budget's rule, scored against its
    own teacher's labels when validation is withheld."""
    d = algo.spec.distill
    rule = budget.rule(torch.stack([z.argmax(1) for z in targets]))
    if batched == "auto":
        batched = batched_pays(student.model, data.public_x)
    if batched and len(targets) > 1:
        reason = vmap_unsupported(student.model, data.public_x)
        if reason is None:
            objective = takfl_objective_stacked(
                torch.stack(targets), self_logits, d.temperature, gamma, d.self_reg_temperature
            )
            runs = run_distillations_batched(
                student.model,
                student.avg_state,
                data.public_x,
                objective,
                len(targets),
                budget.settings,
                seed=seed,
                early_stopping=rule,
                pool=budget.pool,
            )
            return runs, True
        log.warning(
            "prototype %s (%s) cannot be vmapped, distilling sequentially: %s",
            student.name,
            type(student.model).__name__,
            reason,
        )
    runs = [
        run_distillation(
            student.model,
            student.avg_state,
            data.public_x,
            takfl_objective(z, self_logits, d.temperature, gamma, d.self_reg_temperature),
            budget.settings,
            seed=seed,
            early_stopping=None if rule is None else replace(rule, labels=rule.labels_of(i)),
            pool=budget.pool,
        )
        for i, z in enumerate(targets)
    ]
    return runs, False


def choose_scale(
    scorer: MergeScorer, lambdas: torch.Tensor, grid: list[float], data: StepData
) -> float:
    """The scale s in ``grid`` whose merge theta_avg + s * sum lambda tau scores best on
    validation (ties: the smaller s)."""
    if data.val_x is None or data.val_y is None:
        raise ValueError("takfl-scaled chooses its scale on validation; it needs one")
    best_acc, best_loss, best = -1.0, float("inf"), 0.0
    for s in sorted(set(grid)):
        _, acc, loss = best_on_validation(scorer, [lambdas], data.val_x, data.val_y, s)
        if (acc, -loss) > (best_acc, -best_loss):
            best_acc, best_loss, best = acc, loss, s
    return best


def _single_target(
    protos: list[PrototypeInput],
    data: StepData,
    algo: Algorithm,
    seed: int,
    timings: dict[str, float],
    objective: Objective,
    target_labels: torch.Tensor,
) -> dict[str, StepOutput]:
    """Every prototype distils from ``objective`` starting at its theta_avg, stopped by
    the budget's rule for baselines (``target_labels`` (N,): the target's labels on the
    public set, scored on held-out samples without validation); the info records the
    steps used and the estimated GFLOP."""
    budget = plan(algo, data, seed)
    rule = budget.baseline_rule(target_labels)
    t0 = time.perf_counter()
    out = {}
    for j, p in enumerate(protos):
        run = run_distillation(
            p.model,
            p.avg_state,
            data.public_x,
            objective,
            budget.settings,
            seed=seed * 1000 + j,
            early_stopping=rule,
            pool=budget.pool,
        )
        info = steps_info([run], budget.cap, None)
        info["distill_gflop"] = _gflop(p, [run], budget, data, False)
        out[p.name] = StepOutput(run.state, None, info)
    _add(timings, "distill_s", t0)
    return out


def feddf_step(
    protos: list[PrototypeInput],
    data: StepData,
    algo: Algorithm,
    seed: int,
    timings: dict[str, float],
) -> dict[str, StepOutput]:
    """FedDF: every prototype distils from the mean logits of all clients."""
    teachers = [p for p in protos if p.mean_logits is not None]
    if not teachers:
        return fedavg_step(protos, data, algo, seed, timings)
    target = feddf_target(
        [p.mean_logits for p in teachers if p.mean_logits is not None],
        [p.num_clients for p in teachers],
    )
    objective = feddf_objective(target, algo.spec.distill.temperature)
    return _single_target(protos, data, algo, seed, timings, objective, target.argmax(1))


def fedet_step(
    protos: list[PrototypeInput],
    data: StepData,
    algo: Algorithm,
    seed: int,
    timings: dict[str, float],
) -> dict[str, StepOutput]:
    """FedET: every prototype learns the consensus pseudo-labels plus the diversity term."""
    logits = [z for p in protos for z in p.client_logits]
    if not logits:
        return fedavg_step(protos, data, algo, seed, timings)
    labels, diverse, has = fedet_targets(logits)
    objective = fedet_objective(
        labels, diverse, has, algo.spec.distill.temperature, algo.spec.fedet.diversity_weight
    )
    return _single_target(protos, data, algo, seed, timings, objective, labels)


def server_step(
    protos: list[PrototypeInput],
    data: StepData,
    algo: Algorithm,
    *,
    seed: int,
) -> tuple[dict[str, StepOutput], dict[str, float]]:
    """Run the post-aggregation step of ``algo`` for every prototype.

    Returns:
        per prototype its new state (and lambdas for TAKFL), and phase timings in seconds.
    """
    timings: dict[str, float] = {}
    if not algo.validation:
        data = StepData(data.public_x)
    return algo.unit.step(protos, data, algo, seed, timings), timings
