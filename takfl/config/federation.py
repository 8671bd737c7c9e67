"""Federation config: data, partition, prototypes, rounds and the algorithm."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from takfl.config.base import ModelSpec, Strict
from takfl.config.privacy import PrivacySpec
from takfl.config.training import TrainingOverride
from takfl.method_names import ALGORITHMS, LAMBDA_STRATEGIES, check_name


class DataSpec(Strict):
    dataset: Literal[
        "digits", "sensors", "sensors16", "cifar10", "cifar100", "npz", "imagefolder"
    ] = "digits"
    layout: Literal["images", "signals"] = "images"  # npz: (N, C, H, W) or (N, C, L)
    data_dir: str | None = None  # folder (CIFAR, image folder) or file (.npz)
    # Public (unlabelled) data from another data set, e.g. CIFAR-100 for CIFAR-10.
    public_dataset: Literal["cifar10", "cifar100", "npz", "imagefolder"] | None = None
    public_data_dir: str | None = None
    test_from_split: bool = False  # take the test set from the data set's own test split
    test_size: int = Field(0, ge=0)  # carved from the pool when not test_from_split
    validation_size: int = Field(100, ge=0)
    public_size: int = Field(300, ge=0)


class PartitionSpec(Strict):
    alpha: float = Field(0.3, gt=0)  # Dirichlet concentration across a prototype's clients
    min_per_client: int = Field(2, ge=1)
    seed: int = 0


class PrototypeSpec(Strict):
    name: str
    profile: str  # bundled device profile name or a path to a YAML file
    model: ModelSpec | None = None  # overrides the profile's model when given
    clients: int = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)  # fraction of clients sampled per round
    data_ratio: float = Field(gt=0, le=1)  # share of the private data
    training: TrainingOverride | None = None  # overrides the profile's local training


# The budget of a config that names none, in passes over the public set, chosen on
# validation (docs/results/budget.md).
DEFAULT_DISTILL_PASSES = 10.0


class DistillSpec(Strict):
    # The budget of one distillation (the cap when adaptive), in one of three units:
    # epochs, when set, overrides steps, which overrides passes.
    steps: int | None = Field(None, ge=0)  # optimiser steps per distillation
    epochs: int | None = Field(None, gt=0)  # whole passes over the shuffled public set
    # passes over the shuffled public set, fractions allowed: ceil(passes x ceil(N /
    # batch_size)) steps, N the public samples distillation draws from
    passes: float = Field(DEFAULT_DISTILL_PASSES, gt=0, allow_inf_nan=False)
    batch_size: int = Field(64, gt=0)
    learning_rate: float = Field(1e-3, gt=0)  # Adam
    weight_decay: float = Field(0.0, ge=0)  # Adam weight decay
    # T and gamma of a config that names none: chosen on validation with the budget
    # (docs/results/budget.md); the paper's CIFAR settings name theirs.
    temperature: float = Field(1.0, gt=0)  # T, teacher/student softening
    self_reg_weight: float = Field(0.01, ge=0)  # gamma (takfl-reg, takfl-scaled)
    self_reg_temperature: float = Field(20.0, gt=0)  # Ts
    # Adaptive budget, one rule for every distilling method: each distillation is scored
    # on its start and every `check_every` passes (its student's top-1 accuracy on the
    # labelled validation set; validation withheld: its agreement with its own target on
    # a `holdout` share of the public set, left out of distillation), stops
    # `stop_patience` passes after its best score and keeps that best checkpoint; the
    # budget above is the cap. Steps used are recorded per distillation (metrics info).
    # false: every distillation runs the whole budget, except that FedDF and FedET keep
    # their published best checkpoint on validation (eval_every / patience below).
    adaptive: bool = True
    check_every: float = Field(0.25, gt=0, allow_inf_nan=False)  # passes (at least 1 step)
    stop_patience: float = Field(3.0, gt=0, allow_inf_nan=False)  # passes
    holdout: float = Field(0.1, gt=0, lt=1)  # share of the public set, without validation
    # Fixed budget only: FedDF's best checkpoint on validation (its official code), given
    # to FedET too when validation is on: score every `eval_every` steps, stop after
    # `patience` steps without improvement.
    eval_every: int = Field(20, gt=0)
    patience: int = Field(100, gt=0)
    # TAKFL: a student's m distillations (one per teacher) run together, vmapped over
    # stacked copies (takfl/distill_batched.py); false runs them one after another; auto
    # batches on CUDA, and on CPU only students whose forward costs under
    # takfl.distill_batched.CPU_BATCHED_MAX_FLOPS per sample (vmap's batching rules add
    # elementwise passes that larger convolutional models pay for on CPU). Equal
    # results either way, within float rounding.
    batched: bool | Literal["auto"] = "auto"
    # bf16: distillation forward under autocast (fp32 weights and loss), meant for
    # CUDA; fp32: no autocast. compile: torch.compile the distillation forward.
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False


class LambdaSpec(Strict):
    strategy: str = "heuristic"  # a registered lambda strategy (takfl.lambdas)
    # fixed: matrix[student][teacher] in prototype order; a teacher that did not report
    # is dropped and the row renormalised.
    matrix: list[list[float]] | None = None
    # heuristic (reference code): uniform plus candidates_per_exponent Beta(1, 100)^e
    # draws for e in 1, 5, 10, each normalised. "ascending" sorts every draw, as the
    # reference does, which gives the last prototype the largest weight; "unsorted"
    # leaves the draws in random order.
    candidates_per_exponent: int = Field(15, ge=1)
    heuristic_order: Literal["ascending", "unsorted"] = "ascending"
    search_candidates: int = Field(32, ge=1)  # search: random simplex points (+ vertices, uniform)
    learn_steps: int = Field(50, ge=1)  # gradient steps for learned/unsupervised
    learn_rate: float = Field(0.05, gt=0)
    # takfl-scaled only (an ablation, not the paper's method): theta_avg + s * sum lambda tau
    # with s chosen on validation from this grid; 0 keeps theta_avg.
    scale_grid: list[float] = [0.0, 0.5, 1.0]

    @field_validator("strategy")
    @classmethod
    def _registered_strategy(cls, value: str) -> str:
        return check_name("lambda strategy", value, LAMBDA_STRATEGIES)


class FedETSpec(Strict):
    diversity_weight: float = Field(0.1, ge=0)  # weight of the diversity regulariser


class AlgorithmSpec(Strict):
    name: str = "takfl"  # a registered algorithm (takfl.algorithms)
    # Labelled validation for every method that can use it (TAKFL's lambda choice,
    # FedDF/FedET best checkpoint, takfl-scaled's scale); false withholds it from all.
    validation: bool = True
    distill: DistillSpec = DistillSpec()
    lambdas: LambdaSpec = LambdaSpec()
    fedet: FedETSpec = FedETSpec()

    @field_validator("name")
    @classmethod
    def _registered_algorithm(cls, value: str) -> str:
        return check_name("algorithm", value, ALGORITHMS)


Aggregation = Literal["fedavg", "median", "trimmed-mean", "clipped-mean"]


class AggregationSpec(Strict):
    """How each prototype's client updates (and their teacher logits) are combined."""

    # fedavg: sample-weighted mean (McMahan et al. 2017); median: coordinate-wise
    # median; trimmed-mean: coordinate-wise mean without the trim_fraction largest and
    # smallest values (Yin et al. 2018); clipped-mean: weighted mean of deltas each
    # clipped to clip_factor x the median client delta norm.
    method: Aggregation = "fedavg"
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)  # per side, as Flower's FedTrimmedAvg beta
    clip_factor: float = Field(1.0, gt=0, allow_inf_nan=False)


class IntakeSpec(Strict):
    """Bounds a received update must meet before it touches any aggregate
    (takfl.wire.validation, takfl.wire.bounds, coordinator.influence)."""

    # refuse ||delta|| > max_norm_factor * max(||initial global||, norm_floor): the run's
    # round-0 model, which no accepted update can move; honest digits updates measure
    # 0.1-0.5 x the global norm
    max_norm_factor: float = Field(5.0, gt=0, allow_inf_nan=False)
    norm_floor: float = Field(1.0, gt=0, allow_inf_nan=False)
    # per weight tensor: ||delta_t|| <= tensor_factor * max(||initial_t||,
    # tensor_floor * sqrt(numel_t)); honest digits deltas measure <= 0.36 x; null: off
    tensor_factor: float | None = Field(4.0, gt=0, allow_inf_nan=False)
    tensor_floor: float = Field(0.05, gt=0, allow_inf_nan=False)
    # BatchNorm running variances in (0, buffer_factor x the global's largest (or 1)],
    # other buffers within buffer_factor x the global's largest magnitude (or 1); batch
    # counters never go back and grow by at most max_batches in a round
    buffer_factor: float = Field(100.0, ge=1, allow_inf_nan=False)
    max_batches: int = Field(1_000_000, ge=0)
    # Validation-aware acceptance (Zeno++, FLTrust): the update applied at its share of
    # its tier (global + delta / clients sampled in the tier) must not lower the tier's
    # validation accuracy by more than validation_margin points, nor raise its validation
    # loss by more than validation_loss_margin nats; else it is refused. Null: that test
    # is off (so are both when algorithm.validation withholds labelled validation).
    # Honest digits updates cost at most 21 points and 0.31 nats (3 seeds, 10 rounds).
    validation_margin: float | None = Field(30.0, gt=0, le=100, allow_inf_nan=False)
    validation_loss_margin: float | None = Field(2.0, gt=0, allow_inf_nan=False)


class FederationConfig(Strict):
    """Parsed from a YAML file in ``profiles/federations/`` or a user path."""

    name: str
    description: str = ""
    data: DataSpec = DataSpec()
    partition: PartitionSpec = PartitionSpec()
    prototypes: list[PrototypeSpec] = Field(min_length=1)
    rounds: int = Field(10, gt=0)
    algorithm: AlgorithmSpec = AlgorithmSpec()
    aggregation: AggregationSpec = AggregationSpec()
    intake: IntakeSpec = IntakeSpec()
    privacy: PrivacySpec = PrivacySpec()  # plain, or central-dp with its budget

    @field_validator("prototypes")
    @classmethod
    def _prototypes_consistent(cls, value: list[PrototypeSpec]) -> list[PrototypeSpec]:
        names = [p.name for p in value]
        if len(set(names)) != len(names):
            raise ValueError(f"prototype names must be unique, got {names}")
        total = sum(p.data_ratio for p in value)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"prototypes' data_ratio values must sum to 1, they sum to {total:g}")
        return value

    @model_validator(mode="after")
    def _matrix_matches(self) -> FederationConfig:
        m = self.algorithm.lambdas.matrix
        n = len(self.prototypes)
        if m is not None and (len(m) != n or any(len(r) != n for r in m)):
            raise ValueError(f"algorithm.lambdas.matrix must be {n}x{n}, one row per prototype")
        return self

    def prototype(self, name: str) -> PrototypeSpec:
        for p in self.prototypes:
            if p.name == name:
                return p
        raise KeyError(f"no prototype {name!r}; have {[p.name for p in self.prototypes]}")
