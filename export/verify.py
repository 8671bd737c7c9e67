"""Verification of an exported artifact against the PyTorch model it came from.

On real inputs (the test set): largest absolute logit difference, top-1
agreement with PyTorch, accuracy; plus file size and latency per sample at
batch 1 (p50/p90) with a given thread count. PyTorch eager is measured the
same way and is the reference row.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from export.common import TORCH_RUNTIME
from export.runtimes import open_artifact, runtime_status

if TYPE_CHECKING:
    from export.formats import Built, VerifyJob

OK, MISMATCH, FAILED, SKIPPED = "OK", "MISMATCH", "FAILED", "SKIPPED"
FP32_PARITY_TOLERANCE = 1e-4  # max |logit difference| accepted for float artifacts


@dataclass(kw_only=True)
class VerifyRow:
    """One line of the report: one artifact (or PyTorch) on one runtime."""

    prototype: str
    format: str  # a format unit's name, or torch
    quantization: str  # none | int8 | dynamic
    runtime: str
    status: str  # OK | MISMATCH | FAILED | SKIPPED
    reason: str = ""
    artifact: str | None = None
    size_mb: float | None = None
    accuracy: float | None = None  # top-1 on the test set, percent
    agreement: float | None = None  # top-1 agreement with PyTorch, percent
    max_abs_diff: float | None = None  # largest |logit - PyTorch logit|
    p50_ms: float | None = None  # latency per sample at batch 1
    p90_ms: float | None = None
    threads: int | None = None
    batch: str | None = None  # "dynamic" or the fixed batch size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Reference:
    """Real inputs and what PyTorch makes of them.

    x: (N, C, H, W) float32 test images; y: (N,) int64 labels;
    logits: (N, classes) PyTorch eager logits on x.
    """

    x: np.ndarray
    y: np.ndarray
    logits: np.ndarray


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TorchRunner:
    """PyTorch eager behind the same ``run`` interface as the artifact runners."""

    runtime = TORCH_RUNTIME
    batch: int | None = None
    metadata = None

    def __init__(self, model: nn.Module, threads: int) -> None:
        self.model = model.eval()
        self.threads = threads
        self.path = Path("<torch>")

    @torch.inference_mode()
    def run(self, x: np.ndarray) -> np.ndarray:
        with torch_threads(self.threads):
            return self.model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()


def reference_for(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Reference:
    """PyTorch eager logits of ``model`` on the test set (x, y)."""
    xs = x.detach().cpu().float().contiguous().numpy()
    logits = TorchRunner(model, torch.get_num_threads()).run(xs)
    return Reference(xs, y.detach().cpu().numpy().astype(np.int64), logits)


def latency_ms(
    run: Callable[[np.ndarray], Any], samples: np.ndarray, *, iters: int = 100, warmup: int = 10
) -> tuple[float, float]:
    """(p50, p90) milliseconds of ``run`` on single samples (1, C, H, W) cycled from samples."""
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    n = len(samples)
    for i in range(warmup):
        run(samples[i % n : i % n + 1])
    times = np.empty(iters)
    for i in range(iters):
        one = samples[i % n : i % n + 1]
        start = time.perf_counter()
        run(one)
        times[i] = (time.perf_counter() - start) * 1000.0
    return float(np.percentile(times, 50)), float(np.percentile(times, 90))


def compare(logits: np.ndarray, ref: Reference) -> tuple[float, float, float]:
    """(accuracy %, top-1 agreement with PyTorch %, max |difference|) of (N, K) logits."""
    if logits.shape != ref.logits.shape:
        raise ValueError(f"logits of shape {logits.shape}, PyTorch gives {ref.logits.shape}")
    pred = logits.argmax(axis=1)
    acc = float((pred == ref.y).mean() * 100.0)
    agree = float((pred == ref.logits.argmax(axis=1)).mean() * 100.0)
    diff = float(np.abs(logits.astype(np.float64) - ref.logits).max())
    return acc, agree, diff


def verify_runner(
    runner: Any,
    ref: Reference,
    row: VerifyRow,
    *,
    latency_iters: int = 100,
    parity_tolerance: float | None = None,
) -> VerifyRow:
    """Fill ``row`` with parity, accuracy and latency of ``runner`` on ``ref``.

    With ``parity_tolerance`` set (float artifacts), a larger difference turns
    the status to MISMATCH. Errors while running become status FAILED.
    """
    row.threads = runner.threads
    row.batch = "dynamic" if runner.batch is None else str(runner.batch)
    try:
        logits = runner.run(ref.x)
        row.accuracy, row.agreement, row.max_abs_diff = compare(logits, ref)
        row.p50_ms, row.p90_ms = latency_ms(runner.run, ref.x, iters=latency_iters)
    except Exception as e:  # a runtime failing on its artifact is a result, not a crash
        row.status, row.reason = FAILED, f"{type(e).__name__}: {e}"
        return row
    row.status = OK
    if parity_tolerance is not None and row.max_abs_diff > parity_tolerance:
        row.status = MISMATCH
        row.reason = f"max |diff| {row.max_abs_diff:.2e} > {parity_tolerance:.0e}"
    return row


def failure_reason(e: BaseException) -> str:
    """One line (at most 300 characters) saying what went wrong."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def verify_on_runtimes(built: Built, job: VerifyJob) -> list[VerifyRow]:
    """One row per runtime of the artifact's format: parity, accuracy and latency where the
    runtime is installed and loads the artifact; SKIPPED (with the reason) or FAILED
    otherwise. The artifact's notes go into the reason of rows that have none."""
    rows = []
    size_mb = built.path.stat().st_size / 1e6
    for runtime in job.unit.runtime_names:
        row = VerifyRow(
            prototype=job.prototype,
            format=job.unit.name,
            quantization=job.quantization,
            runtime=runtime,
            status=SKIPPED,
            artifact=str(built.path),
            size_mb=size_mb,
            threads=job.threads,
        )
        usable, why = runtime_status(runtime)
        if not usable:
            row.reason = why.split(";")[0]
        else:
            try:
                runner = open_artifact(job.unit, built.path, runtime=runtime, threads=job.threads)
            except Exception as e:  # a runtime refusing an artifact is a result
                row.status, row.reason = FAILED, failure_reason(e)
            else:
                verify_runner(
                    runner,
                    job.reference,
                    row,
                    latency_iters=job.latency_iters,
                    parity_tolerance=job.parity_tolerance,
                )
        if built.notes and row.status != FAILED and not row.reason:
            row.reason = "; ".join(built.notes)[:300]
        rows.append(row)
    return rows
