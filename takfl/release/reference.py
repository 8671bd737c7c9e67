"""Reference inputs and outputs of a release, and the health check's arithmetic.

The reference target of a release is a safetensors file with two float32 tensors:
``inputs`` (N, C, H, W), a few public samples already normalised as the model takes
them, and ``outputs`` (N, num_classes), the logits the released artifact gives on them
in the runtime it is released for. A device runs the artifact on ``inputs`` and
compares (:func:`parity`); the tolerance and the top-1 agreement it must reach are in
the signed :class:`~takfl.release.metadata.ReleaseSpec`.

NumPy only (plus safetensors' NumPy reader): a device needs no torch for this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

INPUTS = "inputs"
OUTPUTS = "outputs"
MAX_REFERENCE_BYTES = 8 * 1024 * 1024
FLOAT_TOLERANCE = 1e-3  # float artifacts: max abs logit difference, relative to the scale
QUANTISED_TOLERANCE = 0.1  # int8/dynamic: kernels may round differently across CPUs
QUANTISED_MIN_TOP1 = 0.75


class ReferenceError(ValueError):
    """A reference file is unreadable or does not fit the release."""


def encode_reference(inputs: np.ndarray, outputs: np.ndarray) -> bytes:
    """Safetensors bytes of the reference pair (both cast to contiguous float32)."""
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    y = np.ascontiguousarray(outputs, dtype=np.float32)
    if x.ndim != 4 or y.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ReferenceError(f"reference needs (N,C,H,W) and (N,K), got {x.shape} and {y.shape}")
    return save({INPUTS: x, OUTPUTS: y})


def decode_reference(
    data: bytes, input_shape: tuple[int, int, int], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, outputs) from a reference file, checked against the release's spec."""
    if len(data) > MAX_REFERENCE_BYTES:
        raise ReferenceError(f"{len(data)} bytes exceeds the {MAX_REFERENCE_BYTES} cap")
    try:
        tensors = load(bytes(data))
    except (SafetensorError, ValueError) as e:
        raise ReferenceError(f"not a safetensors reference file ({e})") from e
    if set(tensors) != {INPUTS, OUTPUTS}:
        raise ReferenceError(f"expected tensors {INPUTS} and {OUTPUTS}, got {sorted(tensors)}")
    x, y = tensors[INPUTS], tensors[OUTPUTS]
    if x.dtype != np.float32 or y.dtype != np.float32:
        raise ReferenceError(f"reference tensors must be float32, got {x.dtype} and {y.dtype}")
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_shape) or len(x) == 0:
        raise ReferenceError(f"inputs of shape {x.shape} do not fit samples of {input_shape}")
    if y.shape != (len(x), num_classes):
        raise ReferenceError(f"outputs of shape {y.shape}, expected {(len(x), num_classes)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ReferenceError("reference tensors hold NaN or inf")
    return x, y


def default_tolerance(quantization: str, outputs: np.ndarray) -> tuple[float, float]:
    """(tolerance, min_top1) for a release: tight for float artifacts, looser for
    quantised ones, both scaled by the reference logits' magnitude."""
    scale = max(1.0, float(np.abs(outputs).max()))
    if quantization == "none":
        return FLOAT_TOLERANCE * scale, 1.0
    return QUANTISED_TOLERANCE * scale, QUANTISED_MIN_TOP1


@dataclass(frozen=True)
class Parity:
    max_abs: float  # largest absolute logit difference
    top1: float  # fraction of inputs whose top-1 class agrees

    def ok(self, tolerance: float, min_top1: float) -> bool:
        return self.max_abs <= tolerance and self.top1 >= min_top1

    def __str__(self) -> str:
        return f"max |diff| {self.max_abs:.3g}, top-1 agreement {self.top1:.0%}"


def parity(outputs: np.ndarray, reference: np.ndarray) -> Parity:
    """How far a device's ``outputs`` are from the ``reference`` outputs (same shape);
    non-finite outputs give an infinite difference."""
    out = np.asarray(outputs, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if out.shape != ref.shape:
        raise ReferenceError(f"outputs of shape {out.shape}, reference {ref.shape}")
    if not np.isfinite(out).all():
        return Parity(float("inf"), 0.0)
    top1 = float((out.argmax(axis=1) == ref.argmax(axis=1)).mean())
    return Parity(float(np.abs(out - ref).max()), top1)


def percentiles_ms(seconds: list[float] | np.ndarray) -> tuple[float, float]:
    """(p50, p99) in milliseconds of latencies given in seconds."""
    arr = np.asarray(seconds, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no latencies to summarise")
    p50, p99 = np.percentile(arr * 1e3, [50, 99])
    return float(p50), float(p99)
