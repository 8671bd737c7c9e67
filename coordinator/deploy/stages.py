"""Rollout stages and thresholds: parsed from the command line, planned over devices."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import pairwise


class RolloutError(ValueError):
    """A rollout cannot be planned as asked (no devices, bad stages or threshold)."""


def parse_fraction(text: str, what: str) -> float:
    """``"20%"`` or ``"0.2"`` as a fraction in [0, 1]; :class:`RolloutError` otherwise."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise RolloutError(f"{what} {text!r} is not a percentage like 20% or a fraction") from None
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise RolloutError(f"{what} {text!r} must lie between 0% and 100%")
    return value


def parse_stages(text: str | Sequence[float]) -> tuple[float, ...]:
    """Cumulative stage fractions from ``"10%,50%,100%"`` (or a sequence): strictly
    increasing, each in (0, 1], the last 100 %."""
    items = (
        [parse_fraction(t, "stage") for t in text.split(",") if t.strip()]
        if isinstance(text, str)
        else [float(v) for v in text]
    )
    if not items:
        raise RolloutError("no stages given; e.g. --stages 10%,50%,100%")
    if any(not 0.0 < v <= 1.0 for v in items):
        raise RolloutError(f"every stage must be above 0% and at most 100%, got {items}")
    if any(b <= a for a, b in pairwise(items)):
        raise RolloutError(f"stages must increase, got {items}")
    if items[-1] != 1.0:
        raise RolloutError(f"the last stage must be 100% (every device), got {items[-1]:.0%}")
    return tuple(items)


def plan_stages(agents: Iterable[str], stages: Sequence[float]) -> dict[str, int]:
    """agent -> index of the stage that first offers it: agents sorted by id, stage k
    covering the first ceil(fraction_k * n) of them (at least one)."""
    ordered = sorted(set(agents))
    if not ordered:
        raise RolloutError("no devices to roll out to")
    n, out, start = len(ordered), {}, 0
    for k, fraction in enumerate(stages):
        end = min(n, max(1, math.ceil(fraction * n - 1e-9)))
        for agent in ordered[start:end]:
            out[agent] = k
        start = max(start, end)
    return out
