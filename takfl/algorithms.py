"""The federated algorithms, each a registered unit resolved once at the entry point.

A unit records its name, the paper it follows and what it needs from a round
(teacher logits, per-client logits, labelled validation). :func:`resolve_algorithm`
turns a config's names into one :class:`Algorithm` object that the engine and the
server step use; nothing downstream dispatches on a name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from takfl.config.federation import AlgorithmSpec
from takfl.lambdas import LambdaStrategy, resolve_lambda_strategy
from takfl.method_names import ALGORITHMS, registry, unknown_name
from takfl.server import (
    PrototypeInput,
    StepData,
    StepOutput,
    fedavg_step,
    feddf_step,
    fedet_step,
    takfl_step,
)

Step = Callable[
    [list[PrototypeInput], StepData, "Algorithm", int, dict[str, float]], dict[str, StepOutput]
]


class AlgorithmError(ValueError):
    """An algorithm or lambda strategy that does not exist or cannot run as configured."""


@dataclass(frozen=True, kw_only=True)
class AlgorithmUnit:
    name: str
    reference: str
    step: Step
    teacher_logits: bool  # needs each prototype's mean client logits on the public set
    client_logits: bool  # needs every client's logits separately
    lambda_strategy: bool  # merges task vectors with a lambda strategy
    # "required": cannot run without labelled validation; "optional": uses it when given
    validation: str


@dataclass(frozen=True, kw_only=True)
class Algorithm:
    """One resolved algorithm: its unit, its settings and its lambda strategy."""

    unit: AlgorithmUnit
    spec: AlgorithmSpec
    lambda_strategy: LambdaStrategy | None

    @property
    def name(self) -> str:
        return self.unit.name

    @property
    def validation(self) -> bool:
        """Whether this run gives labelled validation to the algorithm."""
        return self.spec.validation

    @property
    def needs_teacher_logits(self) -> bool:
        return self.unit.teacher_logits

    @property
    def needs_client_logits(self) -> bool:
        return self.unit.client_logits

    @property
    def label(self) -> str:
        """Row name in tables: the algorithm, with its lambda strategy when it has one."""
        if self.lambda_strategy is None:
            return self.name
        return f"{self.name} ({self.lambda_strategy.name})"


_TAKFL = "TAKFL, Morafah et al., arXiv 2409.18461"
_UNITS: dict[str, AlgorithmUnit] = registry(
    "algorithm",
    ALGORITHMS,
    (
        AlgorithmUnit(
            name="takfl",
            reference=f"{_TAKFL}: per-teacher distillation, merge with sum(lambda) = 1",
            step=partial(takfl_step, self_reg=False, scaled=False),
            teacher_logits=True,
            client_logits=False,
            lambda_strategy=True,
            validation="optional",
        ),
        AlgorithmUnit(
            name="takfl-reg",
            reference=f"{_TAKFL}: takfl with KD self-regularisation (gamma, Ts)",
            step=partial(takfl_step, self_reg=True, scaled=False),
            teacher_logits=True,
            client_logits=False,
            lambda_strategy=True,
            validation="optional",
        ),
        AlgorithmUnit(
            name="takfl-scaled",
            reference="ablation (not in the paper): takfl-reg whose merge is theta_avg + "
            "s * sum lambda tau, s chosen on validation (Ilharco et al. 2023 scaling)",
            step=partial(takfl_step, self_reg=True, scaled=True),
            teacher_logits=True,
            client_logits=False,
            lambda_strategy=True,
            validation="required",
        ),
        AlgorithmUnit(
            name="feddf",
            reference="FedDF, Lin et al., NeurIPS 2020: distil every prototype from the mean "
            "logits of all clients; best checkpoint on validation with early stopping",
            step=feddf_step,
            teacher_logits=True,
            client_logits=False,
            lambda_strategy=False,
            validation="optional",
        ),
        AlgorithmUnit(
            name="fedet",
            reference="FedET, Cho et al., IJCAI 2022: cross-entropy to variance-weighted "
            "consensus pseudo-labels plus a diversity KL to the dissenting clients",
            step=fedet_step,
            teacher_logits=True,
            client_logits=True,
            lambda_strategy=False,
            validation="optional",
        ),
        AlgorithmUnit(
            name="fedavg",
            reference="FedAvg, McMahan et al., AISTATS 2017, within each prototype",
            step=fedavg_step,
            teacher_logits=False,
            client_logits=False,
            lambda_strategy=False,
            validation="optional",
        ),
    ),
    lambda unit: unit.name,
)


def algorithm_units() -> dict[str, AlgorithmUnit]:
    return dict(_UNITS)


def resolve_algorithm(
    spec: AlgorithmSpec,
    name: str | None = None,
    *,
    lambda_strategy: str | None = None,
    validation: bool | None = None,
) -> Algorithm:
    """Resolve ``name`` (default: the config's) with the config's settings, optionally
    overriding the lambda strategy and the validation switch.

    Raises:
        AlgorithmError: an unknown name, or a method/strategy that needs labelled
            validation while validation is withheld.
    """
    name = name or spec.name
    unit = _UNITS.get(name)
    if unit is None:
        raise AlgorithmError(unknown_name("algorithm", name, ALGORITHMS))
    updates: dict[str, object] = {"name": name}
    if validation is not None:
        updates["validation"] = validation
    if lambda_strategy is not None:
        updates["lambdas"] = spec.lambdas.model_copy(update={"strategy": lambda_strategy})
    spec = spec.model_copy(update=updates)
    strategy = None
    if unit.lambda_strategy:
        try:
            strategy = resolve_lambda_strategy(spec.lambdas.strategy)
        except ValueError as e:
            raise AlgorithmError(str(e)) from None
        if strategy.needs_validation and not spec.validation:
            raise AlgorithmError(
                f"lambda strategy {strategy.name!r} chooses coefficients on labelled "
                "validation, which this run withholds; use fixed or unsupervised, or "
                "give validation"
            )
        if strategy.name == "fixed" and spec.lambdas.matrix is None:
            raise AlgorithmError("lambda strategy 'fixed' needs algorithm.lambdas.matrix")
    if unit.validation == "required" and not spec.validation:
        raise AlgorithmError(f"{name} needs labelled validation, which this run withholds")
    return Algorithm(unit=unit, spec=spec, lambda_strategy=strategy)
