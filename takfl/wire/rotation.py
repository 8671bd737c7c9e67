"""Rotated low-bit quantisation (rot2, rot3, rot4): a randomised Hadamard rotation per
block spreads every block's energy evenly, so a uniform quantiser of 2-4 bits with one
scale per block fits it (as in Flower's compression mod; QuaRot, Suresh et al. 2017).

Payload (container, bit fields, fingerprint and the sections of statistics and integer
entries: :mod:`takfl.wire.packing`, :mod:`takfl.wire.sections`)::

    fingerprint (4 bytes)
    log2(block) (u8, 3 .. 12)
    seed (u64): the rotation's random signs
    per coded entry, in layout order:
      blocks: numel // block full blocks of ``block`` entries, then, if
        r = numel % block > 0, one block of P = the next power of two >= r
        (zero-padded); nb blocks in all
      nb steps (f16, finite, >= 0)
      codes: (numel // block) * block + P values of ``bits`` bits

Decoding a block of length P (a power of two): ``y_i = (code_i - (2**bits - 1) / 2) * step``,
then ``x = D * (H y) / sqrt(P)``, with ``H`` the Sylvester-Hadamard matrix of order P and
``D`` the signs below; the padding is dropped. Entry ``j`` (from 0 over the entry's padded
length) of the entry at position ``t`` of the layout has sign -1 where bit 63 of its draw
(:func:`takfl.wire.packing.draws`) is set, else +1.

Encoding: ``y = H (D * x) / sqrt(P)``; ``step = f16(DELTA[bits] * rms(y))`` where DELTA is
the step of the uniform quantiser with least squared error for a unit Gaussian (the
rotated entries are close to Gaussian); ``code = clamp(round_half_even(y / step + (2**bits
- 1) / 2), 0, 2**bits - 1)`` (the middle code when ``step`` is 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from takfl.state import State, StateView
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
from takfl.wire.sign import read_block

# least-squares uniform quantiser step for N(0, 1) with 2**bits levels (Max 1960)
DELTA = {2: 0.9957, 3: 0.5860, 4: 0.3352}


def _name(bits: int) -> str:
    return f"rot{bits}"


def signs(seed: int, position: int, length: int) -> torch.Tensor:
    """The random signs (+-1.0, float32) of the first ``length`` padded entries of the
    entry at layout ``position``: -1 where bit 63 of its draw is set."""
    z = draws(seed, position, length)
    return torch.from_numpy(1.0 - 2.0 * (z >> np.uint64(63)).astype(np.float32))


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``H x / sqrt(P)`` for every row of ``x`` (rows, P), P a power of two; orthonormal
    and its own inverse."""
    rows, p = x.shape
    y = x
    h = 1
    while h < p:
        y = y.reshape(rows, p // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(rows, p) / math.sqrt(p)


def padded_blocks(numel: int, block: int) -> list[tuple[int, int]]:
    """``(rows, length)`` groups of an entry's blocks: full blocks, then the padded last."""
    full, rest = divmod(numel, block)
    groups = [(full, block)] if full else []
    if rest:
        groups.append((1, 1 << (rest - 1).bit_length()))
    return groups


def _encode_section(x: torch.Tensor, sgn: torch.Tensor, bits: int, block: int, name: str) -> bytes:
    steps, codes, start, top = [], [], 0, (1 << bits) - 1
    for rows, length in padded_blocks(x.numel(), block):
        seg = x[start : start + rows * length]
        seg = torch.nn.functional.pad(seg, (0, rows * length - seg.numel()))
        y = hadamard((seg * sgn[start : start + rows * length]).reshape(rows, length))
        rms = y.to(torch.float64).pow(2).mean(dim=1).sqrt()
        head = f16(DELTA[bits] * rms, f"{name} steps")
        s = torch.from_numpy(np.frombuffer(head, dtype="<f2").astype(np.float32))[:, None]
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(y / safe + top / 2).clamp_(0, top)
        q = torch.where(s > 0, q, torch.full_like(q, (top + 1) // 2))
        steps.append(head)
        codes.append(q.to(torch.uint8).reshape(-1))
        start += rows * length
    return b"".join(steps) + pack_bits(torch.cat(codes).numpy(), bits)


def encode(delta: StateView, base: StateView, *, bits: int, block: int, seed: int) -> bytes:
    """Pack ``delta`` (against ``base``; floating entries all finite) as a rot<bits> blob
    with rotation ``seed`` (any integer; taken mod 2**64)."""
    seed &= SEED_MASK

    def section(position: int, e: Entry, x: torch.Tensor) -> bytes:
        padded = sum(rows * n for rows, n in padded_blocks(e.numel, block))
        return _encode_section(x, signs(seed, position, padded), bits, block, e.name)

    entries = layout(delta)
    head = fingerprint(entries) + u8(block.bit_length() - 1) + u32(seed)
    return pack(_name(bits), head + encode_entries(delta, base, entries, section))


def _read_section(
    r: Reader, e: Entry, position: int, seed: int, bits: int, block: int
) -> torch.Tensor:
    groups = padded_blocks(e.numel, block)
    nblocks = sum(rows for rows, _ in groups)
    padded = sum(rows * n for rows, n in groups)
    steps = r.scales(nblocks, f"{e.name} steps")
    codes = torch.from_numpy(r.bits(padded, bits, f"{e.name} codes").astype(np.float32))
    sgn = signs(seed, position, padded)
    out, start, b, middle = [], 0, 0, ((1 << bits) - 1) / 2
    for rows, length in groups:
        s = torch.from_numpy(steps[b : b + rows])[:, None]
        y = (codes[start : start + rows * length].reshape(rows, length) - middle) * s
        out.append(hadamard(y).reshape(-1) * sgn[start : start + rows * length])
        start, b = start + rows * length, b + rows
    return torch.cat(out)[: e.numel]


def decode(blob: bytes, reference: StateView, *, bits: int, max_bytes: int | None = None) -> State:
    """The delta of a rot<bits> blob against ``reference`` (its layout and base).

    Raises:
        CodecError (LayoutMismatch for another model): any field out of its bounds.
    """
    entries = layout(reference)
    r = read_start(unpack(blob, _name(bits), max_bytes=max_bytes), _name(bits), entries)
    block = read_block(r)
    seed = r.u32("seed")
    return read_entries(
        r, entries, reference, lambda r, pos, e: _read_section(r, e, pos, seed, bits, block)
    )


def max_bytes(reference: StateView, *, bits: int) -> int:
    """The largest rot<bits> blob of ``reference``'s layout (smallest block; the padded
    last block is less than twice its entries)."""
    return max_payload(reference, 9, lambda n: 2 * (-(-n // 8) + 1) + -(-(2 * n * bits) // 8) + 1)
