"""Fixed-point encoding of clipped updates in the group Z_(2^bits) (bits 32 or 64).

A client clips its update to L2 norm ``bound`` before it encodes it, so every
coordinate lies in [-bound, bound] and the sum of ``n`` clients in [-n bound, n bound].
:func:`fixed_point_for` picks the most fractional bits for which ``n bound 2^f`` plus the
rounding of ``n`` values stays below ``2^(bits-1)``: the sum, read back as a signed
number, never wraps. Each coordinate is rounded to the nearest multiple of ``2^-f``,
so the decoded sum is within ``n 2^-(f+1)`` of the true sum per coordinate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_DTYPES = {32: np.uint32, 64: np.uint64}
_SIGNED = {32: np.int32, 64: np.int64}


class RangeError(ValueError):
    """The encoding cannot hold the sum of these clients' clipped updates without wrapping."""


@dataclass(frozen=True)
class FixedPoint:
    bits: int  # the group is Z_(2^bits): 32 or 64
    frac_bits: int  # values are multiples of 2^-frac_bits
    bound: float  # every coordinate of an input lies in [-bound, bound]

    @property
    def dtype(self) -> np.dtype:
        """The group's words: uint32 or uint64 (their arithmetic wraps mod 2^bits)."""
        return np.dtype(_DTYPES[self.bits])

    @property
    def scale(self) -> float:
        return float(2**self.frac_bits)

    def max_error(self, clients: int) -> float:
        """The largest difference per coordinate between a decoded sum and the true one."""
        return clients * 0.5 / self.scale

    def encode(self, values: np.ndarray) -> np.ndarray:
        """float values in [-bound, bound] -> group elements (uint of ``bits``).

        Raises:
            RangeError: a value lies outside [-bound, bound] or is not finite.
        """
        x = np.asarray(values, dtype=np.float64)
        if not np.isfinite(x).all():
            raise RangeError("an update to encode holds NaN or inf")
        if x.size and float(np.abs(x).max()) > self.bound * (1 + 1e-9):
            raise RangeError(
                f"a coordinate {float(np.abs(x).max()):.4g} exceeds the bound {self.bound:.4g}: "
                "clip the update first"
            )
        ints = np.rint(x * self.scale).astype(_SIGNED[self.bits])
        return ints.view(self.dtype).copy()

    def decode(self, total: np.ndarray) -> np.ndarray:
        """A sum of encodings (mod 2^bits) -> float64, read as a signed number."""
        signed = np.asarray(total, dtype=self.dtype).view(_SIGNED[self.bits])
        return signed.astype(np.float64) / self.scale


def fixed_point_for(bits: int, bound: float, clients: int) -> FixedPoint:
    """The finest encoding in Z_(2^bits) whose sum of ``clients`` inputs in [-bound, bound]
    cannot wrap: the largest f with ``clients (bound 2^f + 1/2) < 2^(bits-1)``.

    Raises:
        RangeError: not even whole numbers fit (``bits`` too small for the sum), or an
            unsupported ``bits``.
    """
    if bits not in _DTYPES:
        raise RangeError(f"bits must be one of {sorted(_DTYPES)}, got {bits}")
    if not (bound > 0 and math.isfinite(bound)) or clients < 1:
        raise RangeError(f"need a positive bound and clients, got {bound}, {clients}")
    limit = 2 ** (bits - 1)
    frac = math.floor(math.log2((limit / clients - 0.5) / bound)) if limit / clients > 0.5 else -1
    frac = min(frac, bits - 2)  # keep float64's 53 bits meaningful near the top
    while frac >= 0 and clients * (bound * 2**frac + 0.5) >= limit:
        frac -= 1
    if frac < 0:
        raise RangeError(
            f"{clients} clients with coordinates up to {bound:g} overflow Z_2^{bits}; use 64 bits "
            "or a smaller clipping bound"
        )
    return FixedPoint(bits=bits, frac_bits=frac, bound=bound)
