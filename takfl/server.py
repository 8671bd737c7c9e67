"""One server step after aggregation: distillation and merging, per algorithm.

Pure: modules, tensors and state dicts in; state dicts, coefficients and
timings out. The round engine (coordinator) and the benchmarks call this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from takfl.baselines import feddf_objective, feddf_target, fedet_objective, fedet_targets
from takfl.config.federation import AlgorithmSpec
from takfl.distill import DistillSettings, distill, takfl_objective
from takfl.task_arithmetic import (
    MergeScorer,
    lambdas_fixed,
    lambdas_learned,
    lambdas_search,
    lambdas_unsupervised,
    merge,
    task_vector,
)
from takfl.training import predict_logits

State = dict[str, torch.Tensor]


@dataclass
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
class EvalData:
    """Tensors on the compute device. ``public_x`` unlabelled; validation labelled."""

    public_x: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


def _settings(spec: AlgorithmSpec) -> DistillSettings:
    d = spec.distill
    return DistillSettings(d.steps, d.batch_size, d.learning_rate)


def choose_lambdas(
    scorer: MergeScorer, spec: AlgorithmSpec, student_index: int, data: EvalData, seed: int
) -> tuple[torch.Tensor, float, dict[str, float]]:
    """Coefficients and task-vector scale for one student by the configured strategy."""
    lam = spec.lambdas
    fixed_scale = None if lam.scale == "auto" else float(lam.scale)
    if lam.strategy == "fixed":
        if lam.matrix is None:
            raise ValueError("lambda strategy 'fixed' needs algorithm.lambdas.matrix")
        return lambdas_fixed(lam.matrix[student_index]), fixed_scale or 1.0, {}
    if lam.strategy == "search":
        scales = lam.scale_grid if fixed_scale is None else [fixed_scale]
        return lambdas_search(scorer, data.val_x, data.val_y, lam.search_candidates, seed, scales)
    if lam.strategy == "learned":
        return lambdas_learned(
            scorer, data.val_x, data.val_y, lam.learn_steps, lam.learn_rate, seed, fixed_scale
        )
    return lambdas_unsupervised(
        scorer,
        data.public_x,
        lam.learn_steps,
        lam.learn_rate,
        seed,
        1.0 if fixed_scale is None else fixed_scale,
    )


def takfl_step(
    protos: list[PrototypeInput],
    data: EvalData,
    spec: AlgorithmSpec,
    *,
    self_reg: bool,
    seed: int,
    timings: dict[str, float],
) -> dict[str, StepOutput]:
    """TAKFL: every student distils independently from every teacher, then merges."""
    teachers = [p for p in protos if p.mean_logits is not None]
    settings = _settings(spec)
    d = spec.distill
    gamma = d.self_reg_weight if self_reg else 0.0
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
        vectors = []
        for teacher in teachers:
            teacher_logits = teacher.mean_logits
            if teacher_logits is None:  # filtered above; keeps type checkers honest
                continue
            objective = takfl_objective(
                teacher_logits, self_logits, d.temperature, gamma, d.self_reg_temperature
            )
            theta = distill(
                student.model,
                student.avg_state,
                data.public_x,
                objective,
                settings,
                seed=seed * 1000 + j,
            )
            vectors.append(task_vector(theta, student.avg_state))
        t1 = time.perf_counter()
        scorer = MergeScorer(student.model, student.avg_state, vectors, data.public_x.device)
        lam, scale, info = choose_lambdas(scorer, spec, j, data, seed * 1000 + j)
        state = merge(student.avg_state, vectors, lam, scale)
        info["scale"] = scale
        t2 = time.perf_counter()
        timings["distill_s"] = timings.get("distill_s", 0.0) + (t1 - t0)
        timings["merge_s"] = timings.get("merge_s", 0.0) + (t2 - t1)
        names = [t.name for t in teachers]
        out[student.name] = StepOutput(state, dict(zip(names, lam.tolist(), strict=True)), info)
    return out


def single_target_step(
    protos: list[PrototypeInput],
    data: EvalData,
    spec: AlgorithmSpec,
    algorithm: str,
    *,
    seed: int,
    timings: dict[str, float],
) -> dict[str, StepOutput]:
    """FedDF and FedET: one shared target for every student."""
    teachers = [p for p in protos if p.mean_logits is not None]
    if not teachers:
        return {p.name: StepOutput(p.avg_state, None) for p in protos}
    t = spec.distill.temperature
    if algorithm == "feddf":
        target = feddf_target(
            [p.mean_logits for p in teachers if p.mean_logits is not None],
            [p.num_clients for p in teachers],
        )
        objective = feddf_objective(target, t)
    else:
        logits = [z for p in teachers for z in p.client_logits]
        tgt, diverse, has = fedet_targets(logits, t)
        objective = fedet_objective(tgt, diverse, has, t, spec.fedet.diversity_weight)
    settings = _settings(spec)
    t0 = time.perf_counter()
    out = {
        p.name: StepOutput(
            distill(p.model, p.avg_state, data.public_x, objective, settings, seed=seed * 1000 + j),
            None,
        )
        for j, p in enumerate(protos)
    }
    timings["distill_s"] = timings.get("distill_s", 0.0) + time.perf_counter() - t0
    return out


def server_step(
    protos: list[PrototypeInput],
    data: EvalData,
    spec: AlgorithmSpec,
    algorithm: str,
    *,
    seed: int,
) -> tuple[dict[str, StepOutput], dict[str, float]]:
    """Run the post-aggregation step of ``algorithm`` for every prototype.

    Returns:
        per prototype its new state (and lambdas for TAKFL), and phase timings in seconds.
    """
    timings: dict[str, float] = {}
    if algorithm == "fedavg":
        return {p.name: StepOutput(p.avg_state, None) for p in protos}, timings
    if algorithm in ("takfl", "takfl-reg"):
        return takfl_step(
            protos, data, spec, self_reg=algorithm == "takfl-reg", seed=seed, timings=timings
        ), timings
    if algorithm in ("feddf", "fedet"):
        return single_target_step(
            protos, data, spec, algorithm, seed=seed, timings=timings
        ), timings
    raise ValueError(f"unknown algorithm {algorithm!r}")
