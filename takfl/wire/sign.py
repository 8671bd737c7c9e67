"""1-bit sign with a scale per block (scaled signSGD; with error feedback, EF-SignSGD of
Karimireddy et al. 2019), and below one bit per weight by sending the signs of a seeded
random subset (random-k with memory, Stich et al. 2018): both ends draw the same subset
from the seed, so it costs no index.

Payload (container, bit fields, fingerprint, draws and the sections of statistics and
integer entries: :mod:`takfl.wire.packing`, :mod:`takfl.wire.sections`)::

    fingerprint (4 bytes)
    log2(block) (u8, 3 .. 12)
    keep (u8): 0: every entry is sent; else an entry is sent when the top 8 bits of its
      draw are below keep (density keep / 256)
    seed (u32)
    per coded entry, in layout order:
      ceil(numel / block) scales (f16, finite, >= 0), one per block (the last may be short)
      one sign bit (1: +, 0: -) per sent entry of every block whose scale is not 0, in
        order, ceil(bits / 8) bytes

Decoded, a sent entry of block ``b`` is ``scale[b] * (+1 if bit else -1)``; every other
entry is 0. Encoding: a block's scale is the mean of ``|x|`` over its sent entries (the
scale that minimises the squared error of a sign code), rounded to f16; ``keep =
round(256 * density)`` (0 for density 1); bit 1 where ``x >= 0``.
"""

from __future__ import annotations

import numpy as np
import torch

from takfl.state import State, StateView
from takfl.wire.codec_names import MAX_BLOCK_LOG2, MIN_BLOCK_LOG2
from takfl.wire.packing import (
    SEED_MASK,
    Entry,
    Reader,
    draws,
    f16,
    fingerprint,
    layout,
    pack,
    pack_bits,
    read_start,
    u8,
    u32,
    unpack,
)
from takfl.wire.sections import encode_entries, max_payload, read_entries

NAME = "sign1"


def keep_of(density: float) -> int:
    """The payload's ``keep`` byte for a density in (0, 1]: 0 (all) or 1 .. 255."""
    keep = round(256 * density)
    return 0 if keep >= 256 else max(1, keep)


def sent_mask(keep: int, seed: int, position: int, numel: int) -> np.ndarray:
    """Which entries of the entry at layout ``position`` are sent (bool, numel)."""
    if keep == 0:
        return np.ones(numel, dtype=bool)
    return (draws(seed, position, numel) >> np.uint64(56)) < np.uint64(keep)


def block_scales(x: torch.Tensor, sent: np.ndarray, block: int) -> torch.Tensor:
    """Mean ``|x|`` over the sent entries of each block of the flat float32 ``x`` (the
    last block may be short; 0 where none is sent), float32 ``(ceil(numel / block),)``."""
    n = x.numel()
    nblocks = -(-n // block)
    which = torch.arange(n) // block
    mask = torch.from_numpy(sent)
    sums = torch.zeros(nblocks, dtype=torch.float64)
    sums.index_add_(0, which[mask], x[mask].abs().to(torch.float64))
    counts = torch.zeros(nblocks, dtype=torch.float64)
    counts.index_add_(0, which[mask], torch.ones(int(mask.sum()), dtype=torch.float64))
    return (sums / counts.clamp_min(1.0)).to(torch.float32)


def encode(
    delta: StateView, base: StateView, *, block: int, density: float = 1.0, seed: int = 0
) -> bytes:
    """Pack ``delta`` (against ``base``; floating entries all finite) as a sign1 blob;
    ``seed`` (taken mod 2**32) draws the subset sent below density 1."""
    keep, seed = keep_of(density), seed & SEED_MASK

    def section(position: int, e: Entry, x: torch.Tensor) -> bytes:
        sent = sent_mask(keep, seed, position, e.numel)
        head = f16(block_scales(x, sent, block), e.name)
        sent &= np.repeat(np.frombuffer(head, dtype="<f2") > 0, block)[: e.numel]
        return head + pack_bits((x >= 0).numpy()[sent], 1)

    entries = layout(delta)
    head = fingerprint(entries) + u8(block.bit_length() - 1) + u8(keep) + u32(seed)
    return pack(NAME, head + encode_entries(delta, base, entries, section))


def _read_section(
    r: Reader, e: Entry, position: int, block: int, keep: int, seed: int
) -> torch.Tensor:
    scales = r.scales(-(-e.numel // block), f"{e.name} scales")
    per_entry = np.repeat(scales, block)[: e.numel]
    sent = sent_mask(keep, seed, position, e.numel) & (per_entry > 0)
    bits = r.bits(int(sent.sum()), 1, f"{e.name} signs")
    out = np.zeros(e.numel, dtype=np.float32)
    out[sent] = (bits.astype(np.float32) * 2.0 - 1.0) * per_entry[sent]
    return torch.from_numpy(out)


def read_block(r: Reader, lo: int = MIN_BLOCK_LOG2, hi: int = MAX_BLOCK_LOG2) -> int:
    """The payload's block size: a u8 log2 within ``[lo, hi]``."""
    log2 = r.u8("block size")
    if not lo <= log2 <= hi:
        raise r.fail(f"log2(block) {log2} is outside {lo}..{hi}")
    return 1 << log2


def decode(blob: bytes, reference: StateView, *, max_bytes: int | None = None) -> State:
    """The delta of a sign1 blob against ``reference`` (its layout and base).

    Raises:
        CodecError (LayoutMismatch for another model): any field out of its bounds.
    """
    entries = layout(reference)
    r = read_start(unpack(blob, NAME, max_bytes=max_bytes), NAME, entries)
    block = read_block(r)
    keep = r.u8("keep")
    seed = r.u32("seed")
    return read_entries(
        r, entries, reference, lambda r, pos, e: _read_section(r, e, pos, block, keep, seed)
    )


def max_bytes(reference: StateView) -> int:
    """The largest sign1 blob of ``reference``'s layout (smallest block, every entry sent)."""
    return max_payload(reference, 6, lambda n: 2 * -(-n // 2**MIN_BLOCK_LOG2) + -(-n // 8))
