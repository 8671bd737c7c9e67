"""The health check a release passes on the device before it serves: its outputs on the
signed reference inputs (parity), its batch-1 latency against the profile's budget, and
the memory the process needed with it loaded.

NumPy and the runtime the artifact was loaded in; no torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edge_agent.memory import peak_rss_mb
from takfl.release.metadata import Release, ReleaseRefusal
from takfl.release.reference import ReferenceError, decode_reference, parity, percentiles_ms

WARMUP = 3  # batch-1 runs before timing (first runs allocate)
DEFAULT_ITERS = 50


class Model(Protocol):
    """What the check needs of a loaded artifact (``export.runtimes.Runner`` is one)."""

    def run(self, x: np.ndarray) -> np.ndarray: ...  # (N, C, H, W) float32 -> (N, K)


@dataclass(frozen=True, kw_only=True)
class Health:
    """The outcome: ``ok``, or the ``reason`` it failed (``detail`` says how)."""

    ok: bool
    reason: ReleaseRefusal | None = None
    detail: str = ""
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    peak_rss_mb: float | None = None


def batch1_latency(
    run: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, iters: int
) -> tuple[float, float]:
    """(p50, p99) in ms of ``run`` on single samples of ``inputs`` (N, C, H, W), cycling
    through them ``iters`` times after a warm-up."""
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    for i in range(WARMUP):
        run(inputs[i % len(inputs)][None])
    times = []
    for i in range(iters):
        x = inputs[i % len(inputs)][None]
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return percentiles_ms(times)


def check_health(
    runner: Model,
    release: Release,
    reference_bytes: bytes,
    *,
    budget_ms: float | None,
    iters: int = DEFAULT_ITERS,
) -> Health:
    """Run the release's model on its reference inputs and time it.

    Fails with ``malformed`` (the reference file does not fit the release), ``load_failed``
    (the runtime raised on the inputs), ``parity`` (outputs further from the signed
    reference outputs than the spec's tolerance, or too few top-1 agreements) or
    ``too_slow`` (batch-1 p99 over ``budget_ms``, measured twice so that one stall of a
    busy device does not fail a release).
    """
    spec = release.spec
    try:
        inputs, expected = decode_reference(reference_bytes, spec.input_shape, spec.num_classes)
    except ReferenceError as e:
        return Health(ok=False, reason=ReleaseRefusal.MALFORMED, detail=f"reference: {e}")
    try:
        outputs = np.asarray(runner.run(inputs), dtype=np.float32)
        result = parity(outputs, expected)
    except Exception as e:  # runtimes raise their own exception types
        return Health(ok=False, reason=ReleaseRefusal.LOAD_FAILED, detail=f"inference: {e}")
    if not result.ok(spec.tolerance, spec.min_top1):
        return Health(
            ok=False,
            reason=ReleaseRefusal.PARITY,
            detail=f"{result} (tolerance {spec.tolerance:g}, top-1 at least {spec.min_top1:.0%})",
        )
    p50, p99 = batch1_latency(runner.run, inputs, iters)
    if budget_ms is not None and p99 > budget_ms:
        p50, p99 = min((p50, p99), batch1_latency(runner.run, inputs, iters), key=lambda t: t[1])
    peak = peak_rss_mb()
    if budget_ms is not None and p99 > budget_ms:
        return Health(
            ok=False,
            reason=ReleaseRefusal.TOO_SLOW,
            detail=f"batch-1 p99 {p99:.3g} ms over the budget of {budget_ms:g} ms",
            latency_p50_ms=p50,
            latency_p99_ms=p99,
            peak_rss_mb=peak,
        )
    return Health(ok=True, latency_p50_ms=p50, latency_p99_ms=p99, peak_rss_mb=peak)
