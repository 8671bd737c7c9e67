"""Clipping and Gaussian noise on client deltas: the maths of central DP, pure.

A client's *delta* is its trained state minus the round's global, over the floating
entries only (weights and BatchNorm running statistics); integer entries such as
``num_batches_tracked`` never enter a private aggregate. All sums are float64.

Adaptive clipping follows Andrew et al. 2021 ("Differentially private learning with
adaptive clipping", arXiv 1905.03871, Algorithm 1 and Theorem 1): the server learns
the ``gamma``-quantile of the update norms from a noised count of unclipped updates
and moves the bound geometrically; the noise of that count and of the sum together
cost what one Gaussian query of multiplier ``z`` costs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from takfl.method_names import CLIPPING_MODES, lookup, registry
from takfl.state import State, StateView


def floating_delta(state: StateView, reference: StateView) -> State:
    """``state - reference`` over the floating entries of ``reference`` (float64, CPU).

    Raises:
        ValueError: ``state`` lacks an entry of ``reference`` or differs in shape.
    """
    out: State = {}
    for key, ref in reference.items():
        if not ref.is_floating_point():
            continue
        if key not in state:
            raise ValueError(f"the update lacks {key}")
        value = state[key]
        if value.shape != ref.shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} != {tuple(ref.shape)}")
        out[key] = value.detach().to("cpu", torch.float64) - ref.detach().to("cpu", torch.float64)
    return out


def l2_norm(delta: StateView) -> float:
    """The L2 norm of all entries of ``delta`` together."""
    return math.sqrt(sum(float((v.to(torch.float64) ** 2).sum()) for v in delta.values()))


def clip_factor(norm: float, bound: float) -> float:
    """``min(1, bound / norm)``: the scale that brings an L2 norm to at most ``bound``."""
    if not bound > 0:
        raise ValueError(f"the clipping bound must be positive, got {bound}")
    return 1.0 if norm <= bound else bound / norm


def clip(delta: StateView, bound: float) -> tuple[State, float]:
    """``delta`` scaled to L2 norm at most ``bound``, and its norm before clipping."""
    norm = l2_norm(delta)
    scale = clip_factor(norm, bound)
    return {k: v * scale for k, v in delta.items()}, norm


def gaussian_like(delta: StateView, std: float, generator: torch.Generator) -> State:
    """Independent N(0, std^2) noise of ``delta``'s shapes (float64, CPU)."""
    if std < 0 or not math.isfinite(std):
        raise ValueError(f"noise std must be finite and >= 0, got {std}")
    return {
        k: torch.randn(v.shape, dtype=torch.float64, generator=generator) * std
        for k, v in delta.items()
    }


def add_into(total: State, delta: StateView) -> None:
    """``total += delta`` key by key (``total`` gains keys it lacks)."""
    for k, v in delta.items():
        if k in total:
            total[k] += v
        else:
            total[k] = v.clone()


def apply_mean(
    reference: StateView, total: StateView, noise: StateView, denominator: float
) -> State:
    """The released model: ``reference + (total + noise) / denominator`` on the floating
    entries (in their dtype), ``reference``'s own values on the others."""
    if not denominator > 0:
        raise ValueError(f"the denominator must be positive, got {denominator}")
    out: State = {}
    for k, ref in reference.items():
        if not ref.is_floating_point():
            out[k] = ref.detach().clone()
            continue
        zero = torch.zeros(ref.shape, dtype=torch.float64)
        step = (total.get(k, zero) + noise.get(k, zero)) / denominator
        out[k] = (ref.detach().to("cpu", torch.float64) + step).to(ref.dtype)
    return out


VARIANCE_BUFFER = "running_var"  # torch's BatchNorm running variance, last name component
VARIANCE_FLOOR = 1e-2  # the least running variance a noised release keeps


def project_variances(state: State, floor: float = VARIANCE_FLOOR) -> State:
    """``state`` with every BatchNorm running variance raised to at least ``floor``: noise
    can make one negative, and the model's output NaN. A function of the released
    values alone (post-processing), so it costs no privacy."""
    return {
        k: v.clamp_min(floor) if k.rsplit(".", 1)[-1] == VARIANCE_BUFFER else v
        for k, v in state.items()
    }


# -- adaptive clipping (Andrew et al. 2021) --------------------------------------------------
def default_count_noise(expected_clients: int) -> float:
    """sigma_b = expected clients per round / 20, the paper's setting (Section 3.1)."""
    return max(expected_clients, 1) / 20.0


def sum_noise_multiplier(noise_multiplier: float, count_noise: float | None) -> float:
    """z_Delta of the sum when a count with noise ``count_noise`` (sigma_b) shares the
    round's budget: ``(z^-2 - (2 sigma_b)^-2)^(-1/2)`` (Theorem 1); ``z`` itself when the
    bound is fixed (``count_noise`` None).

    Raises:
        ValueError: ``2 sigma_b <= z``: the count alone would spend the whole round.
    """
    if count_noise is None:
        return noise_multiplier
    rest = noise_multiplier**-2 - (2 * count_noise) ** -2
    if rest <= 0:
        raise ValueError(
            f"adaptive clipping needs count noise sigma_b > z / 2 = {noise_multiplier / 2:.3g}, "
            f"got {count_noise:.3g}; raise privacy.clipping.count_noise or sample more clients"
        )
    return rest**-0.5


def noised_fraction(
    unclipped: Iterable[bool], expected_clients: int, count_noise: float, generator: torch.Generator
) -> float:
    """b~ = (number of unclipped updates + N(0, sigma_b^2)) / expected clients."""
    noise = float(torch.randn((), dtype=torch.float64, generator=generator)) * count_noise
    return (sum(1 for u in unclipped if u) + noise) / max(expected_clients, 1)


def next_bound(
    bound: float, fraction: float, target_quantile: float, learning_rate: float
) -> float:
    """C * exp(-eta_C (b~ - gamma)): larger when fewer than gamma were unclipped."""
    return bound * math.exp(-learning_rate * (fraction - target_quantile))


# -- the registered clipping rules -----------------------------------------------------------
@dataclass(frozen=True)
class ClippingRule:
    name: str
    reference: str
    adaptive: bool  # the bound follows a quantile of the update norms (noised count)


_RULES: dict[str, ClippingRule] = registry(
    "clipping mode",
    CLIPPING_MODES,
    (
        ClippingRule("fixed", "a fixed L2 bound, McMahan et al. 2018 (arXiv 1710.06963)", False),
        ClippingRule(
            "adaptive",
            "geometric quantile tracking, Andrew et al. 2021 (arXiv 1905.03871)",
            True,
        ),
    ),
    lambda rule: rule.name,
)


def clipping_rule(name: str) -> ClippingRule:
    """The registered clipping rule ``name``; ValueError listing the known ones."""
    return lookup("clipping mode", _RULES, name)
