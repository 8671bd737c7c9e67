"""Bounded influence inside the bound: the round engine's last check of an update before
it touches any aggregate.

Whatever the transport (virtual clients, MQTT agents whose updates the intake already
checked, updates persisted before a restart), :class:`UpdateGuard` judges each one
against its prototype's global model of the round, in a fixed order:

1. the whole delta's norm, relative to the run's initial global (``intake.max_norm_factor``);
2. every weight tensor's delta against the same initial model (``intake.tensor_factor``)
   and the BatchNorm statistics and counters against the global (:mod:`takfl.wire.bounds`);
3. validation-aware acceptance (:mod:`takfl.influence`, after Zeno++ and FLTrust): the
   update applied at its share of its tier, ``global + share x delta`` (the engine's
   :meth:`~coordinator.engine.RoundEngine.share`: 1/K for K equally weighted sampled
   clients, 1 for a tier of one), must not cost the tier more than
   ``intake.validation_margin`` points of validation accuracy nor
   ``intake.validation_loss_margin`` nats of validation loss.

A failing update is **refused**, not down-weighted: in a tier of one or two clients any
weight left to an attacker is a large share of the aggregate, a down-weight would also
change honest updates whose cost is merely non-zero (and so the clean run's figures),
and a refusal is named, counted and logged where a down-weight would be silent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch
from torch import nn

from takfl.config.federation import IntakeSpec
from takfl.influence import (
    CostMargins,
    ValidationScore,
    ValidationScorer,
    partial_application,
    validation_cost,
)
from takfl.state import State, StateView
from takfl.wire.bounds import StateBounds, check_state, state_bounds
from takfl.wire.validation import ACCEPTED, Refusal, UpdateBounds, Verdict, delta_norm, refuse

log = logging.getLogger(__name__)


def buffer_names(model: nn.Module) -> frozenset[str]:
    """State-dict names of the module's buffers (BatchNorm statistics and counters)."""
    return frozenset(name for name, _ in model.named_buffers())


def prototype_bounds(
    spec: IntakeSpec, initial: Mapping[str, StateView], models: Mapping[str, nn.Module]
) -> dict[str, StateBounds]:
    """Each prototype's :class:`StateBounds` from its initial global and its model."""
    return {
        p: state_bounds(
            initial[p],
            buffer_names(models[p]),
            tensor_factor=spec.tensor_factor,
            tensor_floor=spec.tensor_floor,
            buffer_factor=spec.buffer_factor,
            max_batches=spec.max_batches,
        )
        for p in initial
    }


class UpdateGuard:
    """Judges client updates of one prototype's round against that round's global.

    ``models``: a scratch module per prototype (used only as a function); ``val_x``,
    ``val_y``: labelled validation data on the modules' device (empty, or ``validation``
    False as when the run withholds validation from every method: step 3 is off).
    """

    def __init__(
        self,
        spec: IntakeSpec,
        initial: Mapping[str, StateView],
        models: Mapping[str, nn.Module],
        val_x: torch.Tensor,
        val_y: torch.Tensor,
        *,
        validation: bool = True,
    ) -> None:
        self.norms = UpdateBounds(norm_factor=spec.max_norm_factor, norm_floor=spec.norm_floor)
        self.bounds = prototype_bounds(spec, initial, models)
        self.margins = CostMargins(
            accuracy_points=spec.validation_margin, loss_nats=spec.validation_loss_margin
        )
        self.models = models
        self.val_x, self.val_y = val_x, val_y
        wanted = spec.validation_margin is not None or spec.validation_loss_margin is not None
        self.validating = wanted and validation and len(val_y) > 0
        if wanted and not self.validating:
            log.warning(
                "validation-aware acceptance is off: the run has no labelled validation data "
                "or withholds it"
            )
        self._baseline: dict[str, ValidationScore] = {}
        self._scorers: dict[str, ValidationScorer] = {}  # a private copy per prototype
        self.seconds = 0.0  # spent judging since the round started

    def start_round(self) -> None:
        """A new round: new globals to score against."""
        self._baseline = {}
        self.seconds = 0.0

    def judge(
        self, prototype: str, state: StateView, base: StateView, share: float = 1.0
    ) -> Verdict:
        """``state``: a client's full new weights for ``prototype``; ``base``: the round's
        global it trained from; ``share`` in (0, 1]: its expected share of the tier's
        aggregate. Accepted, or refused with a named reason."""
        start = time.perf_counter()
        try:
            return self._judge(prototype, state, base, share)
        finally:
            self.seconds += time.perf_counter() - start

    def _judge(self, prototype: str, state: StateView, base: StateView, share: float) -> Verdict:
        delta: State = {
            k: t.detach().to(torch.float32) - base[k].detach().to(torch.float32)
            for k, t in state.items()
            if t.is_floating_point()
        }
        bounds = self.bounds[prototype]
        norm = delta_norm(delta)
        cap = self.norms.max_norm(base, bounds.reference_norm)
        if norm > cap:
            return refuse(
                Refusal.NORM_BOUND,
                f"delta norm {norm:.4g} > {self.norms.norm_factor:g} x initial global norm "
                f"(bound {cap:.4g})",
            )
        verdict = check_state(delta, state, base, bounds)
        if not verdict.accepted or not self.validating:
            return verdict
        return self._validate(prototype, state, base, share)

    def _validate(self, prototype: str, state: StateView, base: StateView, share: float) -> Verdict:
        scorer = self._scorers.get(prototype)
        if scorer is None:
            scorer = self._scorers[prototype] = ValidationScorer(self.models[prototype])
        before = self._baseline.get(prototype)
        if before is None:
            before = self._baseline[prototype] = scorer.score(base, self.val_x, self.val_y)
        after = scorer.score(partial_application(base, state, share), self.val_x, self.val_y)
        cost = validation_cost(before, after)
        why = self.margins.exceeded(cost)
        log.debug(
            "%s update at share %.2f: accuracy %.1f -> %.1f, loss %.3f -> %.3f",
            prototype,
            share,
            before.accuracy,
            after.accuracy,
            before.loss,
            after.loss,
        )
        if why is None:
            return ACCEPTED
        return refuse(Refusal.VALIDATION_COST, f"applied at share {share:.2f}: {why}")
