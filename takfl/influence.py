"""Validation-aware acceptance of one client update: what it alone would cost its tier.

The coordinator holds labelled validation data. Following Zeno++ (Xie, Koyejo and
Gupta 2020, "Zeno++: Robust Fully Asynchronous SGD", ICML; arXiv 1903.07020), an update
is scored by what applying it does to the loss on that server-side data, and refused
when the score is below a margin; unlike Zeno++ the step is not a learning-rate-sized
probe but the update's own share of its tier's aggregate. Like FLTrust (Cao, Fang, Liu
and Gong 2021, "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping",
NDSS; arXiv 2012.13995) the trust comes from the server's own labelled data, not from
a majority of clients, so it works for tiers with one or two clients, where a median
or a trimmed mean cannot tell an attacker from its peer. FLTrust's other half
(weighting by cosine similarity to a server-trained update, rescaled to its norm) is
not used: it changes every honest update's weight, hence the clean run's figures.

Pure: a module used as a function (``torch.func.functional_call``, its own weights
untouched; :class:`ValidationScorer` overwrites a private copy of it instead), tensors and
state dicts in, scores out.

Shapes: ``x`` (N, C, H, W) or (N, C, L) validation inputs on the model's device,
``y`` (N,) class indices.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from takfl.state import State, StateView


@dataclass(frozen=True)
class ValidationScore:
    """A model's top-1 accuracy (percent) and mean cross-entropy (nats) on validation."""

    accuracy: float
    loss: float


@dataclass(frozen=True)
class ValidationCost:
    """What applying an update costs on validation: accuracy lost (points) and loss
    gained (nats); negative when the update helps."""

    accuracy_drop: float
    loss_rise: float


def partial_application(base: StateView, state: StateView, share: float) -> State:
    """``base + share * (state - base)`` for floating entries (in float32, then the
    base's dtype); ``state``'s own values for the others (batch counters)."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    out: State = {}
    for k, b in base.items():
        t = state[k]
        if b.is_floating_point():
            b32 = b.detach().to(torch.float32)
            out[k] = (b32 + share * (t.detach().to(torch.float32) - b32)).to(b.dtype)
        else:
            out[k] = t
    return out


@torch.inference_mode()
def validation_score(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 512,
) -> ValidationScore:
    """Accuracy and loss of ``model`` with the weights ``state`` (moved to ``x``'s
    device) on (x, y), in eval mode. Non-finite logits count as wrong, with infinite loss."""
    if len(x) == 0:
        raise ValueError("no validation data to score on")
    if model.training:  # a walk over every submodule: only when one is needed
        model.eval()
    weights = {k: v.to(x.device) for k, v in state.items()}
    return _score(lambda xb: functional_call(model, weights, (xb,)), x, y, batch_size)


def _score(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
) -> ValidationScore:
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        z = forward(xb).float()
        correct += int((z.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(z, yb, reduction="sum"))
    if not math.isfinite(loss):
        loss = math.inf
    return ValidationScore(100.0 * correct / len(x), loss / len(x))


class ValidationScorer:
    """:func:`validation_score` of many states of one architecture, with less overhead per
    state: a private copy of the module (made once; the caller's module is never touched)
    whose parameters and buffers are overwritten in place, then called as it is. The same
    forward on the same values, so the same scores; a state whose names are not the
    module's own (tied weights, missing entries) is scored through
    :func:`validation_score`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self._slots = dict(self.model.named_parameters()) | dict(self.model.named_buffers())

    @torch.inference_mode()
    def score(
        self,
        state: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int = 512,
    ) -> ValidationScore:
        """As ``validation_score(model, state, x, y, batch_size)``."""
        if len(x) == 0:
            raise ValueError("no validation data to score on")
        if state.keys() != self._slots.keys() or any(
            state[k].dtype != t.dtype or state[k].shape != t.shape for k, t in self._slots.items()
        ):
            return validation_score(self.model, state, x, y, batch_size)
        with torch.no_grad():
            for k, t in self._slots.items():
                t.copy_(state[k])
        return _score(self.model, x, y, batch_size)


def validation_cost(before: ValidationScore, after: ValidationScore) -> ValidationCost:
    """``after`` (the update applied) against ``before`` (the global model)."""
    return ValidationCost(before.accuracy - after.accuracy, after.loss - before.loss)


@dataclass(frozen=True, kw_only=True)
class CostMargins:
    """The most an update may cost its tier on validation; None: not checked."""

    accuracy_points: float | None = 30.0
    loss_nats: float | None = 2.0

    def exceeded(self, cost: ValidationCost) -> str | None:
        """Why ``cost`` is over a margin, or None."""
        a, n = self.accuracy_points, self.loss_nats
        if a is not None and cost.accuracy_drop > a:
            return f"validation accuracy -{cost.accuracy_drop:.1f} points (margin {a:g})"
        if n is not None and not cost.loss_rise <= n:
            return f"validation loss +{cost.loss_rise:.3g} nats (margin {n:g})"
        return None
