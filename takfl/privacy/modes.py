"""The privacy modes, each a registered unit resolved once at the entry point.

A unit says what the mode protects and what it therefore forbids: under central DP
nothing computed from one client's model may reach a released model except through
the clipped, noised sum, so teachers come from the noised aggregate, and methods
that need individual outputs (FedET's per-client logits; median, trimmed mean and
clipped mean, whose result depends on individual updates in ways clipping does not
bound) are refused. FedDF and TAKFL run in a DP-correct form: their teacher of a
prototype is the logits of its noised averaged model on the public set. Under secure
aggregation the coordinator never holds a client's model at all, so the same rules
follow from what it can compute: teachers from each prototype's aggregate, no
per-client outputs, no aggregator over individual updates.
"""

from __future__ import annotations

from dataclasses import dataclass

from takfl.algorithms import Algorithm
from takfl.config.privacy import PrivacySpec
from takfl.method_names import PRIVACY_MODES, lookup, registry
from takfl.robust import Aggregator


class PrivacyConfigError(ValueError):
    """A federation whose algorithm or aggregation cannot run in its privacy mode.
    ``problems`` lists each one with how to fix it."""

    def __init__(self, mode: str, problems: list[str]) -> None:
        self.mode = mode
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"privacy mode {mode!r} cannot run this federation:\n{lines}")


@dataclass(frozen=True, kw_only=True)
class PrivacyMode:
    name: str
    reference: str
    spends_budget: bool  # updates are clipped and the sums noised; epsilon is tracked
    teacher_from_aggregate: bool  # teacher logits from the released aggregate only
    per_update_aggregation: bool  # aggregators over individual updates are allowed
    per_client_outputs: bool  # algorithms using each client's outputs are allowed
    secure_sum: bool = False  # the coordinator receives each prototype's sum, never an update


_UNITS: dict[str, PrivacyMode] = registry(
    "privacy mode",
    PRIVACY_MODES,
    (
        PrivacyMode(
            name="plain",
            reference="no formal privacy: the coordinator sees every update; intake checks apply",
            spends_budget=False,
            teacher_from_aggregate=False,
            per_update_aggregation=True,
            per_client_outputs=True,
        ),
        PrivacyMode(
            name="central-dp",
            reference="DP-FedAvg, McMahan et al. 2018 (arXiv 1710.06963), per prototype; "
            "adaptive clipping, Andrew et al. 2021 (arXiv 1905.03871)",
            spends_budget=True,
            teacher_from_aggregate=True,
            per_update_aggregation=False,
            per_client_outputs=False,
        ),
        PrivacyMode(
            name="secagg",
            reference="SecAgg+, Bell et al. 2020 (arXiv 2009.08452), within each prototype",
            spends_budget=False,
            teacher_from_aggregate=True,
            per_update_aggregation=False,
            per_client_outputs=False,
            secure_sum=True,
        ),
        PrivacyMode(
            name="secagg-dp",
            reference="distributed DP under SecAgg+: each client adds its share of the "
            "Gaussian noise before masking (Kairouz et al. 2021, continuous form); the "
            "accountant as for central DP",
            spends_budget=True,
            teacher_from_aggregate=True,
            per_update_aggregation=False,
            per_client_outputs=False,
            secure_sum=True,
        ),
    ),
    lambda unit: unit.name,
)


def privacy_mode(name: str) -> PrivacyMode:
    """The registered mode ``name``; ValueError listing the known ones."""
    return lookup("privacy mode", _UNITS, name)


def privacy_problems(mode: PrivacyMode, algorithm: Algorithm, aggregator: Aggregator) -> list[str]:
    """Why ``algorithm`` with ``aggregator`` cannot run in ``mode`` (empty: it can)."""
    problems = []
    if algorithm.needs_client_logits and not mode.per_client_outputs:
        problems.append(
            f"algorithm {algorithm.name!r} distils from every client's own logits, which "
            f"{mode.name} never releases; use takfl-reg, takfl or feddf (their teachers "
            "come from each prototype's aggregate)"
        )
    if not aggregator.streaming and not mode.per_update_aggregation:
        why = (
            "needs every individual update, and the coordinator receives only each prototype's sum"
            if mode.secure_sum
            else f"combines individual updates in a way clipping does not bound; {mode.name} "
            "clips every update and adds noise to the sum"
        )
        problems.append(f"aggregation {aggregator.name!r} {why}: set aggregation.method to fedavg")
    return problems


def resolve_privacy(spec: PrivacySpec, algorithm: Algorithm, aggregator: Aggregator) -> PrivacyMode:
    """The mode of ``spec``, checked against the algorithm and the aggregation.

    Raises:
        PrivacyConfigError: every reason they cannot run together.
    """
    mode = privacy_mode(spec.mode)
    problems = privacy_problems(mode, algorithm, aggregator)
    if problems:
        raise PrivacyConfigError(mode.name, problems)
    return mode
