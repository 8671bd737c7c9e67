"""The sections of a packed payload: one per entry of the reference layout, in its order.

Every packed codec (:mod:`takfl.wire.packing`) writes the same three kinds:

- **coded** (every floating entry that is not a running statistic: weights, kernels,
  biases, normalisation weights): as the codec encodes it, with error feedback;
- **statistic** (floating entries named ``running_mean`` or ``running_var``, or ending
  with ``.running_mean`` / ``.running_var``: the running statistics of PyTorch's
  normalisation layers, whose state-dict names are the wire's tensor names): a scale
  ``s`` (f16, finite, >= 0) and one 4-bit code ``c`` per entry (bit field, 0 .. 14; 15 is
  refused), ``q = c - 7``, never fed back (statistics are not sums of updates). A
  mean's delta is ``q * s``; a variance is sent as its log-ratio to the reference, so
  that it can never turn negative: its delta is ``base * expm1(q * s)`` (``base``: the
  reference's value). Encoding: ``s = max|r| / 7`` rounded to f16, ``q =
  clamp(round_half_even(r / s), -7, 7)``, with ``r`` the mean's delta, or
  ``log(trained / base)`` clamped to [-16, 16] (``-16`` where the trained variance is
  not positive). Four bits keep a variance within about 7 % of its trained value per
  update, at a quarter of the float16 size;
- **exact** (integer and boolean entries, e.g. ``num_batches_tracked``): every value as
  a zigzag varint (``(v << 1) ^ (v >> 63)``, at most 10 bytes), within its dtype's range
  (booleans 0 or 1). They are not differenced: the delta carries the trained value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from takfl.state import State, StateView
from takfl.wire.errors import CodecError
from takfl.wire.packing import (
    FINGERPRINT_BYTES,
    FRAME_BYTES,
    MAX_VARINT_BYTES,
    Entry,
    Reader,
    f16,
    layout,
    pack_bits,
    varints,
)

MEAN, VARIANCE = "running_mean", "running_var"
LOG_RATIO_CAP = 16.0  # a variance moves at most exp(16) ~ 8.9e6 times in one update
STAT_BITS, STAT_MAX = 4, 7  # statistics: 4-bit codes, q in [-7, 7]

# section(position in the layout, entry, flat float32 values, all finite) -> bytes
Section = Callable[[int, Entry, torch.Tensor], bytes]
# section(reader, position in the layout, entry) -> flat float32 values
ReadSection = Callable[[Reader, int, Entry], torch.Tensor]


def statistic(name: str) -> str | None:
    """``running_mean`` or ``running_var`` when ``name`` is such a statistic, else None."""
    for kind in (MEAN, VARIANCE):
        if name == kind or name.endswith("." + kind):
            return kind
    return None


def fed_back(delta: StateView) -> list[str]:
    """Names of the entries whose coding error feeds back: floating, not statistics."""
    return [k for k, t in delta.items() if t.is_floating_point() and statistic(k) is None]


def _log_ratio(delta: torch.Tensor, base: torch.Tensor, name: str) -> torch.Tensor:
    b = base.detach().to("cpu", torch.float64).reshape(-1)
    if not bool(((b > 0) & torch.isfinite(b)).all()):
        raise CodecError(f"{name}: the reference variance must be positive to send a ratio")
    trained = b + delta.to(torch.float64)
    ratio = torch.where(trained > 0, torch.log(trained.clamp_min(1e-300) / b), -LOG_RATIO_CAP)
    return ratio.clamp(-LOG_RATIO_CAP, LOG_RATIO_CAP)


def _encode_statistic(e: Entry, x: torch.Tensor, base: torch.Tensor) -> bytes:
    r = _log_ratio(x, base, e.name) if statistic(e.name) == VARIANCE else x.to(torch.float64)
    s = (r.abs().max() / STAT_MAX if r.numel() else torch.zeros(())).reshape(1)
    head = f16(s, e.name)
    s16 = float(np.frombuffer(head, dtype="<f2")[0])
    q = torch.zeros(r.numel(), dtype=torch.int64)
    if s16 > 0:
        q = torch.round(r / s16).clamp_(-STAT_MAX, STAT_MAX).to(torch.int64)
    return head + pack_bits((q + STAT_MAX).numpy(), STAT_BITS)


def _read_statistic(r: Reader, e: Entry, base: torch.Tensor) -> torch.Tensor:
    s = float(r.scales(1, f"{e.name} scale")[0])
    codes = r.bits(e.numel, STAT_BITS, e.name)
    if bool((codes > 2 * STAT_MAX).any()):
        raise r.fail(f"{e.name}: statistic code 15 (codes are 0..14)")
    v = torch.from_numpy(codes.astype(np.float32) - STAT_MAX) * s
    if statistic(e.name) == VARIANCE:
        return base.detach().to("cpu", torch.float32).reshape(-1) * torch.expm1(v)
    return v


def _encode_exact(t: torch.Tensor) -> bytes:
    v = t.detach().to("cpu").reshape(-1).to(torch.int64).numpy().astype(np.int64)
    zig = (v.astype(np.uint64) << np.uint64(1)) ^ (v >> 63).astype(np.uint64)
    return varints(zig)


def _read_exact(r: Reader, e: Entry) -> torch.Tensor:
    zig = r.varints(e.numel, e.name, max_bytes=MAX_VARINT_BYTES)
    v = (zig >> np.uint64(1)).astype(np.int64) ^ -(zig & np.uint64(1)).astype(np.int64)
    if e.dtype == torch.bool:
        lo, hi = 0, 1
    else:
        info = torch.iinfo(e.dtype)
        lo, hi = info.min, info.max
    if v.size and (int(v.min()) < lo or int(v.max()) > hi):
        raise r.fail(f"{e.name}: a value outside {e.dtype}'s range")
    return torch.from_numpy(v).to(e.dtype)


def encode_entries(
    delta: StateView, base: StateView, entries: Sequence[Entry], section: Section
) -> bytes:
    """The sections of every entry of ``delta`` (against ``base``) in layout order.

    Raises:
        CodecError: a floating entry with NaN or inf, or a value a section cannot carry.
    """
    parts = []
    for position, e in enumerate(entries):
        t = delta[e.name]
        if not e.floating:
            parts.append(_encode_exact(t))
            continue
        x = t.detach().to("cpu", torch.float32).reshape(-1)
        if not bool(torch.isfinite(x).all()):
            raise CodecError(f"{e.name}: non-finite values cannot be encoded")
        if statistic(e.name) is not None:
            parts.append(_encode_statistic(e, x, base[e.name]))
        else:
            parts.append(section(position, e, x))
    return b"".join(parts)


def read_entries(
    r: Reader, entries: Sequence[Entry], base: StateView, section: ReadSection
) -> State:
    """Every entry in layout order (``section`` reads the coded ones, flat), then checks
    that nothing is left. Floating entries come back float32, the others in their dtype."""
    out: State = {}
    for position, e in enumerate(entries):
        if not e.floating:
            out[e.name] = _read_exact(r, e).reshape(e.shape)
        elif statistic(e.name) is not None:
            out[e.name] = _read_statistic(r, e, base[e.name]).reshape(e.shape)
        else:
            out[e.name] = section(r, position, e).reshape(e.shape)
    r.finish()
    return out


def max_section_bytes(e: Entry, coded: Callable[[int], int]) -> int:
    """A bound on one entry's section: ``coded(numel)`` for a coded entry."""
    if not e.floating:
        return e.numel * MAX_VARINT_BYTES
    if statistic(e.name) is not None:
        return 2 + -(-e.numel * STAT_BITS // 8)
    return coded(e.numel)


def max_payload(reference: StateView, head: int, coded: Callable[[int], int]) -> int:
    """A bound on a packed blob for ``reference``'s layout: framing, fingerprint, ``head``
    bytes of settings and every section at its largest."""
    total = FRAME_BYTES + FINGERPRINT_BYTES + head
    return total + sum(max_section_bytes(e, coded) for e in layout(reference))
