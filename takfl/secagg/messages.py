"""The parameters of one secure-aggregation round and the messages of its four stages
(Bell et al. 2020, Algorithm 2): advertise keys, share keys, masked input, unmasking."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from takfl.secagg.fixedpoint import FixedPoint, fixed_point_for


class Failure(str, Enum):
    """Why a round of secure aggregation produced no sum."""

    TOO_FEW_KEYS = "too_few_keys"  # fewer than t clients advertised keys
    TOO_FEW_SHARES = "too_few_shares"  # fewer than t clients shared their keys
    TOO_FEW_INPUTS = "too_few_inputs"  # fewer than t masked inputs arrived
    TOO_FEW_UNMASKING = "too_few_unmasking"  # a mask seed lacked t shares to recover it
    PROTOCOL = "protocol"  # a message out of order, from a stranger, or malformed


class SecAggFailure(RuntimeError):
    """The round ends without a sum; ``reason`` says why, ``detail`` for whom."""

    def __init__(self, reason: Failure, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"secure aggregation failed ({reason.value}): {detail}")


MIN_INPUTS = 2  # never unmask fewer inputs than this, whatever the threshold
NOISE_RANGE = 10.0  # distributed DP: the encoding holds C + this many noise deviations


def least_inputs(threshold: int) -> int:
    """The fewest masked inputs a sum is ever unmasked from: max(2, t)."""
    return max(MIN_INPUTS, threshold)


def client_noise_std(noise_multiplier: float, bound: float, threshold: int) -> float:
    """Distributed DP: the Gaussian noise each client adds per coordinate, so that any sum
    the coordinator may unmask (at least :func:`least_inputs` inputs) carries noise of
    standard deviation at least ``noise_multiplier x bound``, as central DP's sum does."""
    return noise_multiplier * bound / math.sqrt(least_inputs(threshold))


def encoding_bound(bound: float, noise_std: float) -> float:
    """The range of one input's coordinates: the clipping bound, plus ``NOISE_RANGE``
    noise deviations (a client clamps its noised coordinates to it; beyond 10 deviations
    the chance is below 1e-23 per coordinate)."""
    return bound + NOISE_RANGE * noise_std


def round_graph(
    n: int, neighbours: int | None = None, threshold: int | None = None
) -> tuple[int, int]:
    """(neighbours k, threshold t) for a round of ``n`` sampled clients. Defaults: the full
    graph (SecAgg) up to 10 clients, else degree 2 ceil(log2 n) (SecAgg+, Bell et al.
    2020); t a majority of each client's k neighbours and itself, ceil((k + 1) / 2), and
    at least 2 (one survivor's "sum" would be its update). A
    given k is capped at n - 1 and rounded up to even below it; t is capped at k + 1."""
    if n < 2:
        return 0, 1
    if neighbours is None:
        k = n - 1 if n <= 10 else 2 * math.ceil(math.log2(n))
    else:
        k = neighbours + (neighbours % 2)
    k = min(k, n - 1)
    t = max(2, math.ceil((k + 1) / 2)) if threshold is None else min(threshold, k + 1)
    return k, t


@dataclass(frozen=True, kw_only=True)
class RoundParams:
    """What every participant of one round agrees on before it starts (public)."""

    context: bytes  # binds keys, masks and shares to one run, round and prototype
    clients: tuple[str, ...]  # the sampled clients, in an order everyone shares
    neighbours: int  # k: the SecAgg+ graph's degree; >= len(clients) - 1 is full SecAgg
    # t: shares needed to recover a secret. A client shares to its k neighbours and
    # itself, so a full graph (SecAgg) survives n - t dropouts; SecAgg+ needs t of each
    # client's k + 1 to stay
    threshold: int
    bits: int = 32  # the group Z_(2^bits)
    bound: float  # clients clip to this L2 norm (so each coordinate is within it)
    length: int  # the update's number of coordinates
    # n, the clients sampled in the round (the encoding must hold their sum): 0 for
    # len(clients). An agent knows only itself and its neighbours, so it is told n
    population: int = 0

    def __post_init__(self) -> None:
        n = len(self.clients)
        if len(set(self.clients)) != n or n < 2:
            raise ValueError("secure aggregation needs two or more distinct clients")
        degree = min(self.neighbours, n - 1)
        if degree < n - 1 and degree % 2:
            raise ValueError(f"the neighbour count must be even below n - 1, got {degree}")
        if not 1 <= self.threshold <= degree + 1:
            raise ValueError(
                f"need 1 <= threshold <= neighbours + 1 ({degree + 1}), got {self.threshold}"
            )

    @property
    def encoding(self) -> FixedPoint:
        return fixed_point_for(self.bits, self.bound, self.population or len(self.clients))

    def neighbours_of(self, client: str) -> tuple[str, ...]:
        """The clients ``client`` masks with and shares its seeds to: everyone else for full
        SecAgg, else k/2 on each side on a ring shuffled by the context (a Harary graph,
        symmetric, the same for everyone)."""
        n = len(self.clients)
        if self.neighbours >= n - 1:
            return tuple(c for c in self.clients if c != client)
        ring = sorted(
            self.clients, key=lambda c: hashlib.sha256(self.context + c.encode()).digest()
        )
        at = ring.index(client)
        half = self.neighbours // 2
        near = {ring[(at + d) % n] for d in range(-half, half + 1) if d}
        return tuple(c for c in self.clients if c in near)


@dataclass(frozen=True)
class KeysAdvert:
    """Stage 0, client -> server: its two fresh X25519 public keys."""

    client: str
    channel_key: bytes  # encrypts shares between neighbours
    mask_key: bytes  # agrees pairwise mask seeds


@dataclass(frozen=True)
class SealedShare:
    """Stage 1, client -> server -> neighbour: shares of the sender's self-mask seed and
    mask private key, sealed (AES-GCM) to the receiver; the server cannot read them."""

    sender: str
    receiver: str
    sealed: bytes


@dataclass(frozen=True)
class MaskedInput:
    """Stage 2, client -> server: encode(update) + self mask +- pairwise masks, mod 2^bits."""

    client: str
    masked: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 3, server -> clients: who sent a masked input and who dropped after sharing."""

    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class UnmaskReply:
    """Stage 3, client -> server: its shares of each surviving neighbour's self-mask seed
    and of each dropped neighbour's mask private key; never both for one neighbour."""

    client: str
    seed_shares: dict[str, tuple[int, bytes]]
    key_shares: dict[str, tuple[int, bytes]]
