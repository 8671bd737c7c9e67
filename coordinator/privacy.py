"""The coordinator's privacy budget: per prototype its noise, its clipping bound and
its ledger, checked before every round and recorded after every release.

Built once at the entry point (:func:`build_privacy`) from the federation config's
``privacy`` section; the round engine asks it for each prototype's accumulator,
checks the budget before a round's tasks go out, and reports each release to it.
In plain mode every hook is a no-op. The noise of a run comes from the operating
system's entropy unless a seed is given (simulations, for reproducible figures:
a seeded noise is no protection against whoever knows the seed).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from coordinator.transport.secure_rounds import round_noise
from takfl.config import FederationConfig
from takfl.config.privacy import PrivacySpec
from takfl.privacy.accountant import PrivacyLedger, calibrate_noise
from takfl.privacy.central import ClippedSum
from takfl.privacy.clipping import (
    clipping_rule,
    default_count_noise,
    next_bound,
    sum_noise_multiplier,
)
from takfl.privacy.modes import PrivacyMode, privacy_mode
from takfl.secagg.aggregate import SecureMean
from takfl.state import StateView

log = logging.getLogger(__name__)

SECURE_MARGIN_S = 10.0  # past a secure round's stage timeouts: the sum, the unmasking
EPSILON_SLACK = 1e-9  # relative: an epsilon this close to the budget is within it


class PrivacyBudgetExceeded(RuntimeError):
    """A round (or the run) would spend more than the configured epsilon."""


def planned_sample_rate(clients: int, rate: float) -> float:
    """The chance that a given client of a prototype is sampled when all are available:
    ceil(rate * clients) / clients, as :func:`coordinator.engine.sample_clients` draws."""
    return max(1, math.ceil(rate * clients - 1e-9)) / clients


@dataclass(kw_only=True)
class PrototypeBudget:
    """One prototype's private settings and what it has spent."""

    noise_multiplier: float  # z: the whole round's (sum and, when adaptive, the count)
    clip_norm: float  # C for the next round
    sample_rate: float  # planned chance of a client being sampled in a round
    count_noise: float | None  # sigma_b of the unclipped count (adaptive clipping), else None
    ledger: PrivacyLedger

    @property
    def sum_multiplier(self) -> float:
        """z_Delta: the noise multiplier left for the sum."""
        return sum_noise_multiplier(self.noise_multiplier, self.count_noise)


class RunPrivacy:
    """The privacy of one run. ``budgets`` is empty in a mode that spends no budget."""

    def __init__(
        self,
        mode: PrivacyMode,
        spec: PrivacySpec,
        budgets: dict[str, PrototypeBudget],
        noise_seed: int | None = None,
    ) -> None:
        self.mode, self.spec, self.budgets = mode, spec, budgets
        self.noise_seed = noise_seed
        self._order = {name: i for i, name in enumerate(budgets)}

    # -- before ---------------------------------------------------------------------------
    def check_run(self, rounds: int) -> None:
        """Refuse a run whose ``rounds`` more rounds at the planned sampling would pass the
        budget for any prototype."""
        for name, b in self.budgets.items():
            delta = self.spec.delta
            eps = b.ledger.epsilon_after(b.noise_multiplier, b.sample_rate, rounds, delta)
            if self._over(eps):
                spent = b.ledger.epsilon(delta)
                raise PrivacyBudgetExceeded(
                    f"prototype {name}: {rounds} more round(s) at noise multiplier "
                    f"{b.noise_multiplier:.4g} and sampling rate {b.sample_rate:.3g} would spend "
                    f"epsilon {eps:.3f} at delta {delta:g}, over the budget "
                    f"{self.spec.epsilon:g} (spent so far {spent:.3f}); "
                    "run fewer rounds, raise privacy.noise_multiplier, or leave it unset so it "
                    "is calibrated to the budget"
                )

    def check_round(
        self,
        round_id: int,
        plan: Mapping[str, Sequence[str]],
        available: Mapping[str, Sequence[str]],
    ) -> None:
        """Refuse round ``round_id`` before its tasks go out if it would pass the budget."""
        for name, ids in plan.items():
            b = self.budgets.get(name)
            if b is None or not ids:
                continue
            q = round_sample_rate(ids, available.get(name, ()))
            eps = b.ledger.epsilon_after(b.noise_multiplier, q, 1, self.spec.delta)
            if self._over(eps):
                raise PrivacyBudgetExceeded(
                    f"round {round_id} would bring prototype {name} to epsilon {eps:.3f} at "
                    f"delta {self.spec.delta:g}, over the budget {self.spec.epsilon:g}; the run "
                    f"stops after round {round_id - 1}"
                )

    def _over(self, eps: float) -> bool:
        budget = self.spec.epsilon
        return budget is not None and eps > budget * (1 + EPSILON_SLACK)

    def client_noise(self, prototype: str) -> float:
        """Under secagg-dp, the noise multiplier z of ``prototype``'s sum, whose share each
        of its clients adds (0: the clients add none)."""
        b = self.budgets.get(prototype)
        return b.sum_multiplier if self.mode.secure_sum and b is not None else 0.0

    def secure_stages_s(self) -> float:
        """How long a secure round may run past its tasks' deadline: the keys stage closes
        then, and shares, masked inputs and unmasking may each take their stage timeout
        (0 in other modes)."""
        if not self.mode.secure_sum:
            return 0.0
        return 3 * self.spec.secagg.stage_timeout_s + SECURE_MARGIN_S

    # -- during ---------------------------------------------------------------------------
    def accumulator(
        self, round_id: int, prototype: str, reference: StateView, sampled: int
    ) -> ClippedSum | SecureMean | None:
        """The private accumulator of ``prototype``'s round: the secure sum's mean under
        secure aggregation, the clipped noised sum under central DP (None: the
        aggregator's own, in plain mode or for a prototype with nobody sampled)."""
        if self.mode.secure_sum:
            if not sampled:
                return None
            b = self.budgets.get(prototype)
            if b is None:
                return SecureMean(reference, bound=self.spec.clip_bound)
            return SecureMean(
                reference,
                bound=b.clip_norm,
                denominator=sampled,
                noise_std=round_noise(self.spec, sampled, b.sum_multiplier),
            )
        b = self.budgets.get(prototype)
        if b is None or sampled < 1:
            return None
        return ClippedSum(
            reference,
            bound=b.clip_norm,
            denominator=sampled,
            noise_std=b.sum_multiplier * b.clip_norm,
            generator=self._generator(round_id, prototype),
        )

    def _generator(self, round_id: int, prototype: str) -> torch.Generator:
        if self.noise_seed is None:
            seed = secrets.randbits(63)
        else:
            seed = (self.noise_seed * 1_000_003 + round_id) * 101 + self._order[prototype]
        return torch.Generator().manual_seed(seed % (2**63))

    def released(
        self,
        prototype: str,
        acc: ClippedSum | SecureMean,
        sampled: Sequence[str],
        available: Sequence[str],
    ) -> dict[str, float]:
        """Record one release of ``prototype``; move its clipping bound when adaptive.
        Returns what metrics.jsonl records of it (nothing an individual update decides
        except through noise)."""
        b = self.budgets[prototype]
        q = round_sample_rate(sampled, available)
        used = b.clip_norm
        b.ledger.record(b.noise_multiplier, q)
        info = {
            "epsilon": b.ledger.epsilon(self.spec.delta),
            "delta": self.spec.delta,
            "noise_multiplier": b.noise_multiplier,
            "clip_norm": used,
            "sample_rate": q,
        }
        if b.count_noise is not None and isinstance(acc, ClippedSum):
            c = self.spec.clipping
            fraction = acc.noised_unclipped_fraction(b.count_noise)
            b.clip_norm = next_bound(used, fraction, c.target_quantile, c.learning_rate)
            info["unclipped_fraction"] = fraction  # noised, as Andrew et al. release it
        return info

    # -- persistence ----------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """What state.json keeps to resume: per prototype its bound, noise and history."""
        return {
            "mode": self.mode.name,
            "delta": self.spec.delta,
            "budget": self.spec.epsilon,
            "prototypes": {
                name: {
                    "noise_multiplier": b.noise_multiplier,
                    "clip_norm": b.clip_norm,
                    "history": [list(s) for s in b.ledger.history],
                    "epsilon": b.ledger.epsilon(self.spec.delta),
                }
                for name, b in self.budgets.items()
            },
        }

    def load_state(self, saved: Mapping[str, Any] | None) -> None:
        """Continue from :meth:`to_state`'s record (a resumed run).

        Raises:
            PrivacyBudgetExceeded: the record is of another mode, or lacks a prototype
                this run spends budget on (its history would be lost).
        """
        if not self.budgets:
            return
        if not saved or saved.get("mode") != self.mode.name:
            raise PrivacyBudgetExceeded(
                f"the run directory holds no {self.mode.name} ledger; a private run cannot "
                "resume a run whose spending it does not know"
            )
        protos = saved.get("prototypes", {})
        for name, b in self.budgets.items():
            if name not in protos:
                raise PrivacyBudgetExceeded(f"the saved ledger lacks prototype {name}")
            rec = protos[name]
            b.noise_multiplier = float(rec["noise_multiplier"])
            b.clip_norm = float(rec["clip_norm"])
            b.ledger = PrivacyLedger(b.ledger.unit.name, rec["history"])

    def epsilons(self) -> dict[str, float]:
        """Epsilon spent so far per prototype."""
        return {n: b.ledger.epsilon(self.spec.delta) for n, b in self.budgets.items()}


def round_sample_rate(sampled: Sequence[str], available: Sequence[str]) -> float:
    """The chance a client of the prototype had of being sampled this round: sampled over
    those it was drawn from (1 when nobody else was there)."""
    pool = len(set(available) | set(sampled))
    return min(1.0, len(sampled) / pool) if pool else 1.0


def with_privacy(cfg: FederationConfig, overrides: Mapping[str, Any]) -> FederationConfig:
    """``cfg`` with its privacy section updated by the non-None entries of ``overrides``
    (``mode``, ``epsilon``, ``delta``, ``noise_multiplier``, ``accountant``, and
    ``clipping``/``clip_norm`` for ``clipping.mode``/``clipping.norm``; under secagg
    ``clip_norm`` sets ``secagg.clip_norm``), validated again.

    Raises:
        ValueError: the result is not a valid privacy section (pydantic's message).
    """
    section = cfg.privacy.model_dump()
    clip_keys = {"clipping": "mode", "clip_norm": "norm"}
    mode = overrides.get("mode") or section["mode"]
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "clip_norm" and privacy_mode(mode).secure_sum:
            section["secagg"]["clip_norm"] = value
        elif key in clip_keys:
            section["clipping"][clip_keys[key]] = value
        else:
            section[key] = value
    return cfg.model_copy(update={"privacy": PrivacySpec.model_validate(section)})


def build_privacy(
    cfg: FederationConfig, *, rounds: int, noise_seed: int | None = None
) -> RunPrivacy:
    """The run's privacy for ``rounds`` rounds: per prototype the noise multiplier (the
    config's, or calibrated to the budget over ``rounds`` at its planned sampling rate),
    checked against the budget.

    Raises:
        PrivacyBudgetExceeded: the configured noise cannot last ``rounds`` rounds.
        ValueError: adaptive clipping whose count noise is too small for the noise.
    """
    spec = cfg.privacy
    mode = privacy_mode(spec.mode)
    budgets: dict[str, PrototypeBudget] = {}
    if mode.spends_budget:
        if spec.epsilon is None:  # the config refuses this; kept for type checkers
            raise ValueError("a private mode needs privacy.epsilon")
        for p in cfg.prototypes:
            q = planned_sample_rate(p.clients, p.sample_rate)
            z = spec.noise_multiplier
            if z is None:
                z = calibrate_noise(spec.accountant, spec.epsilon, spec.delta, q, rounds)
            count_noise = None
            if clipping_rule(spec.clipping.mode).adaptive:
                expected = max(1, math.ceil(p.sample_rate * p.clients - 1e-9))
                count_noise = spec.clipping.count_noise or default_count_noise(expected)
            budget = PrototypeBudget(
                noise_multiplier=z,
                clip_norm=spec.clip_bound,
                sample_rate=q,
                count_noise=count_noise,
                ledger=PrivacyLedger(spec.accountant),
            )
            _ = budget.sum_multiplier  # refuses a count noise too small for z, now
            budgets[p.name] = budget
            log.info(
                "prototype %s: %s, z=%.4g, C=%.4g, q=%.3g, budget eps=%g at delta=%g",
                p.name,
                mode.name,
                z,
                spec.clip_bound,
                q,
                spec.epsilon,
                spec.delta,
            )
    privacy = RunPrivacy(mode, spec, budgets, noise_seed)
    privacy.check_run(rounds)
    return privacy
