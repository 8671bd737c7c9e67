"""Top-k sparse deltas: of each coded tensor only its largest-magnitude entries go.

Payload (container, varints, fingerprint and the sections of statistics and integer
entries: :mod:`takfl.wire.packing`, :mod:`takfl.wire.sections`)::

    fingerprint (4 bytes)
    per coded entry, in layout order:
      k (varint, 0 <= k <= numel)
      k index steps (varints): the first index, then index[i] - index[i-1] >= 1, so
        indices are strictly increasing and the last is below numel
      values: topk-int8: scale s (f16, finite, >= 0), then k int8 in [-127, 127],
                value = q * s
              topk-fp16: k f16 values, finite

Decoded, an entry is zero everywhere but at its indices (float32, the reference's shape).

Encoding (the sender's choice, not checked by a receiver): ``k = ceil(density * numel)``
(at least 1, at most the entry's non-zero count), the ``k`` entries of largest ``|x|``
(ties: lower index first); int8 values with ``s = max|x_selected| / 127`` rounded to
f16, ``q = clamp(round_half_even(x / s))``. What is not sent is the error-feedback
residual (:mod:`takfl.wire.codecs`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from takfl.state import State, StateView
from takfl.wire.codec import INT8_MAX
from takfl.wire.packing import (
    INDEX_VARINT_BYTES,
    Entry,
    Reader,
    f16,
    fingerprint,
    layout,
    pack,
    read_start,
    unpack,
    varints,
)
from takfl.wire.sections import encode_entries, max_payload, read_entries

VALUE_BYTES = {"int8": 1, "fp16": 2}


def _name(values: str) -> str:
    return f"topk-{values}"


def select(x: torch.Tensor, density: float) -> torch.Tensor:
    """Indices (int64, ascending) of the ``ceil(density * numel)`` largest ``|x|`` of the
    flat float32 ``x`` (ties: lower index), never more than its non-zero entries."""
    n = x.numel()
    k = min(max(1, math.ceil(density * n - 1e-9)), int(torch.count_nonzero(x)))
    order = torch.argsort(x.abs(), descending=True, stable=True)
    return torch.sort(order[:k]).values


def _values_bytes(v: torch.Tensor, values: str, name: str) -> bytes:
    if values == "fp16":
        return f16(v, f"{name} (use topk-int8)")
    amax = v.abs().max() if v.numel() else torch.zeros(())
    head = f16((amax / INT8_MAX).reshape(1), name)
    scale = float(np.frombuffer(head, dtype="<f2")[0])
    q = torch.zeros(v.numel(), dtype=torch.int8)
    if scale > 0:
        q = torch.round(v / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return head + q.numpy().tobytes()


def encode(delta: StateView, base: StateView, *, values: str, density: float) -> bytes:
    """Pack ``delta`` (against ``base``; floating entries all finite) as a top-k blob."""

    def section(position: int, e: Entry, x: torch.Tensor) -> bytes:
        idx = select(x, density)
        steps = torch.diff(idx, prepend=torch.zeros(1, dtype=torch.int64))
        head = varints(np.array([idx.numel()])) + varints(steps.numpy())
        return head + _values_bytes(x[idx], values, e.name)

    entries = layout(delta)
    payload = fingerprint(entries) + encode_entries(delta, base, entries, section)
    return pack(_name(values), payload)


def _read_values(r: Reader, values: str, k: int, what: str) -> torch.Tensor:
    if values == "fp16":
        v = r.array("<f2", k, what).astype(np.float32)
        if not bool(np.isfinite(v).all()):
            raise r.fail(f"{what}: a value that is NaN or infinite")
        return torch.from_numpy(v)
    scale = float(r.scales(1, f"{what} scale")[0])
    q = r.array("<i1", k, what)
    if bool((q < -INT8_MAX).any()):
        raise r.fail(f"{what}: int8 value -128 (the range is -127..127)")
    return torch.from_numpy(q.astype(np.float32)) * scale


def _read_section(r: Reader, values: str, e: Entry) -> torch.Tensor:
    n = e.numel
    k = r.varint(f"{e.name} count")
    if k > n:
        raise r.fail(f"{e.name}: {k} indices for {n} entries")
    steps = r.varints(k, f"{e.name} indices")
    if k and bool((steps[1:] == 0).any()):
        raise r.fail(f"{e.name}: indices are not strictly increasing")
    idx = np.cumsum(steps, dtype=np.uint64)
    if k and int(idx[-1]) >= n:
        raise r.fail(f"{e.name}: index {int(idx[-1])} is beyond its {n} entries")
    vals = _read_values(r, values, k, e.name)
    out = torch.zeros(n, dtype=torch.float32)
    out[torch.from_numpy(idx.astype(np.int64))] = vals
    return out


def decode(
    blob: bytes, reference: StateView, *, values: str, max_bytes: int | None = None
) -> State:
    """The sparse delta of a top-k blob against ``reference`` (its layout and base).

    Raises:
        CodecError (LayoutMismatch for another model): any field out of its bounds.
    """
    entries = layout(reference)
    r = read_start(unpack(blob, _name(values), max_bytes=max_bytes), _name(values), entries)
    return read_entries(r, entries, reference, lambda r, _, e: _read_section(r, values, e))


def max_bytes(reference: StateView, *, values: str) -> int:
    """The largest top-k blob of ``reference``'s layout: every entry sent, index steps of
    one byte but the first and those of 128 or more (at most numel / 128)."""

    def coded(n: int) -> int:
        steps = 2 * INDEX_VARINT_BYTES + n + n // 128 * (INDEX_VARINT_BYTES - 1)
        return steps + n * VALUE_BYTES[values] + 2

    return max_payload(reference, 0, coded)
