"""1-bit sign with a scale per block (scaled signSGD; with error feedback, EF-SignSGD of
Karimireddy et al. 2019).

Payload (container, bit fields, fingerprint and the entries that are not compressed:
:mod:`takfl.wire.packing`)::

    fingerprint (8 bytes)
    log2(block) (u8, 3 .. 12)
    per compressed entry, in layout order (the others: see takfl.wire.packing):
      ceil(numel / block) scales (f16, finite, >= 0)
      numel sign bits (1: +, 0: -), ceil(numel / 8) bytes

Decoded, entry ``i`` of a flattened tensor is ``scale[i // block] * (+1 if bit else -1)``.
Encoding: ``scale`` is the mean of ``|x|`` over the block (the scale that minimises the
squared error of a sign code), rounded to f16; bit 1 where ``x >= 0``.
"""

from __future__ import annotations

import numpy as np
import torch

from takfl.state import State, StateView
from takfl.wire.codec import FP16_MAX
from takfl.wire.codec_names import MAX_BLOCK_LOG2, MIN_BLOCK_LOG2
from takfl.wire.errors import CodecError
from takfl.wire.packing import (
    Entry,
    Reader,
    check_finite_nonneg,
    encode_entries,
    fingerprint,
    layout,
    max_payload,
    pack,
    pack_bits,
    read_start,
    u8,
    unpack,
)

NAME = "sign1"


def block_scales(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean ``|x|`` per block of the flat float32 ``x`` (the last block may be short), as
    float16; shape ``(ceil(numel / block),)``."""
    n = x.numel()
    nblocks = -(-n // block)
    sums = torch.zeros(nblocks, dtype=torch.float64)
    sums.index_add_(0, torch.arange(n) // block, x.abs().to(torch.float64))
    counts = torch.full((nblocks,), float(block), dtype=torch.float64)
    if n % block:
        counts[-1] = n % block
    scale = sums / counts
    if bool((scale > FP16_MAX).any()):
        raise CodecError("a block's mean magnitude is beyond the float16 range")
    return scale.to(torch.float16)


def encode(delta: StateView, *, block: int) -> bytes:
    """Pack ``delta`` (floating entries all finite) as a sign1 blob."""

    def section(position: int, e: Entry, x: torch.Tensor) -> bytes:
        scales = block_scales(x, block).numpy().astype("<f2").tobytes()
        return scales + pack_bits((x >= 0).numpy(), 1)

    entries = layout(delta)
    head = fingerprint(entries) + u8(block.bit_length() - 1)
    return pack(NAME, head + encode_entries(delta, entries, section))


def _read_section(r: Reader, e: Entry, block: int) -> torch.Tensor:
    scales = r.array("<f2", -(-e.numel // block), f"{e.name} scales").astype(np.float32)
    check_finite_nonneg(scales, r, e.name)
    bits = r.bits(e.numel, 1, f"{e.name} signs")
    signs = bits.astype(np.float32) * 2.0 - 1.0
    return torch.from_numpy(signs * np.repeat(scales, block)[: e.numel])


def read_block(r: Reader, lo: int = MIN_BLOCK_LOG2, hi: int = MAX_BLOCK_LOG2) -> int:
    """The payload's block size: a u8 log2 within ``[lo, hi]``."""
    log2 = r.u8("block size")
    if not lo <= log2 <= hi:
        raise r.fail(f"log2(block) {log2} is outside {lo}..{hi}")
    return 1 << log2


def decode(blob: bytes, reference: StateView, *, max_bytes: int | None = None) -> State:
    """The delta of a sign1 blob, shaped like ``reference``.

    Raises:
        CodecError (LayoutMismatch for another model): any field out of its bounds.
    """
    entries = layout(reference)
    r = read_start(unpack(blob, NAME, max_bytes=max_bytes), NAME, entries)
    block = read_block(r)
    return r.entries(entries, lambda r, position, e: _read_section(r, e, block))


def max_bytes(reference: StateView) -> int:
    """The largest sign1 blob of ``reference``'s layout (smallest block)."""
    return max_payload(reference, 1, lambda n: 2 * -(-n // 2**MIN_BLOCK_LOG2) + -(-n // 8))
