"""A client's side of one SecAgg+ round, as a state machine:
advertise -> share -> mask -> unmask. Each step refuses to run out of order."""

from __future__ import annotations

import os
from enum import Enum

import numpy as np

from takfl.secagg.crypto import (
    CHANNEL_INFO,
    KEY_BYTES,
    agree,
    expand_mask,
    new_key_pair,
    open_sealed,
    seal,
    split_secret,
)
from takfl.secagg.masks import apply_mask, pair_sign, pairwise_mask
from takfl.secagg.messages import (
    Failure,
    KeysAdvert,
    MaskedInput,
    RoundParams,
    SealedShare,
    SecAggFailure,
    UnmaskReply,
    UnmaskRequest,
)

_INDEX_BYTES = 2


class ClientStage(Enum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    UNMASKED = "unmasked"


def clip_vector(x: np.ndarray, bound: float) -> np.ndarray:
    """``x`` scaled to L2 norm at most ``bound`` (float64): what a client sends in secagg,
    since nobody can check its update afterwards."""
    v = np.asarray(x, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    return v if norm <= bound else v * (bound / norm)


def noised_input(
    clipped: np.ndarray, noise_std: float, bound: float, rng: np.random.Generator
) -> np.ndarray:
    """Distributed DP: ``clipped`` plus N(0, noise_std^2) on every coordinate, clamped to
    [-bound, bound] (the encoding's range, :func:`takfl.secagg.messages.encoding_bound`);
    ``clipped`` itself when there is no noise."""
    x = np.asarray(clipped, dtype=np.float64)
    if noise_std <= 0:
        return x
    return np.clip(x + rng.normal(0.0, noise_std, x.shape), -bound, bound)


def _associated(params: RoundParams, sender: str, receiver: str) -> bytes:
    return params.context + b"|" + sender.encode() + b"|" + receiver.encode()


class SecAggClient:
    """One client of one round. Holds its keys, its seed and the shares it received."""

    def __init__(self, client: str, params: RoundParams) -> None:
        if client not in params.clients:
            raise ValueError(f"{client} is not sampled in this round")
        self.client, self.params = client, params
        self.stage = ClientStage.NEW
        self._channel = new_key_pair()
        self._mask = new_key_pair()
        self._seed = os.urandom(KEY_BYTES)  # the self-mask seed b_u
        self._roster: dict[str, tuple[bytes, bytes]] = {}
        self._held: dict[str, tuple[int, bytes, bytes]] = {}  # owner -> (index, seed, key)

    def _expect(self, stage: ClientStage) -> None:
        if self.stage is not stage:
            raise SecAggFailure(
                Failure.PROTOCOL,
                f"{self.client}: expected stage {stage.value}, at {self.stage.value}",
            )

    def advertise(self) -> KeysAdvert:
        self._expect(ClientStage.NEW)
        self.stage = ClientStage.ADVERTISED
        return KeysAdvert(self.client, self._channel.public, self._mask.public)

    def share(self, roster: dict[str, tuple[bytes, bytes]]) -> list[SealedShare]:
        """``roster``: each neighbour that advertised -> (channel key, mask key). Returns the
        sealed shares of this client's seed and mask key, one per neighbour."""
        self._expect(ClientStage.ADVERTISED)
        mine = set(self.params.neighbours_of(self.client))
        self._roster = {c: keys for c, keys in roster.items() if c in mine}
        holders = sorted([*self._roster, self.client])  # it keeps a share itself (SecAgg)
        t = self.params.threshold
        if len(holders) < t:
            raise SecAggFailure(
                Failure.TOO_FEW_KEYS, f"{self.client} has {len(holders) - 1} neighbours, {t} needed"
            )
        seeds = split_secret(self._seed, t, len(holders))
        keys = split_secret(self._mask.private, t, len(holders))
        out = []
        for holder, (idx, seed_share), (_, key_share) in zip(holders, seeds, keys, strict=True):
            if holder == self.client:
                self._held[holder] = (idx, seed_share, key_share)
                continue
            channel = agree(
                self._channel.private, self._roster[holder][0], CHANNEL_INFO, self.params.context
            )
            plain = idx.to_bytes(_INDEX_BYTES, "big") + seed_share + key_share
            sealed = seal(channel, plain, _associated(self.params, self.client, holder))
            out.append(SealedShare(self.client, holder, sealed))
        self.stage = ClientStage.SHARED
        return out

    def mask(self, update: np.ndarray, shares: list[SealedShare]) -> MaskedInput:
        """``update``: this client's clipped update (float, ``params.length`` values);
        ``shares``: the sealed shares its neighbours sent it (they define who masks with it)."""
        self._expect(ClientStage.SHARED)
        p = self.params
        for s in shares:
            self._keep(s)
        if len(self._held) < p.threshold:
            raise SecAggFailure(
                Failure.TOO_FEW_SHARES,
                f"{self.client} holds shares of {len(self._held)} clients, {p.threshold} needed",
            )
        x = np.asarray(update, dtype=np.float64).reshape(-1)
        if x.size != p.length:
            raise ValueError(f"the update has {x.size} values, the round {p.length}")
        enc = p.encoding
        total = enc.encode(x) + expand_mask(self._seed, p.length, enc.dtype)
        for peer in sorted(set(self._held) - {self.client}):
            mask = pairwise_mask(
                self._mask.private, self._roster[peer][1], p.context, p.length, enc.dtype
            )
            total = apply_mask(total, mask, pair_sign(self.client, peer))
        self.stage = ClientStage.MASKED
        return MaskedInput(self.client, total)

    def _keep(self, share: SealedShare) -> None:
        if share.receiver != self.client or share.sender not in self._roster:
            raise SecAggFailure(Failure.PROTOCOL, f"{self.client} got a share not meant for it")
        channel = agree(
            self._channel.private, self._roster[share.sender][0], CHANNEL_INFO, self.params.context
        )
        plain = open_sealed(
            channel, share.sealed, _associated(self.params, share.sender, self.client)
        )
        idx = int.from_bytes(plain[:_INDEX_BYTES], "big")
        body = plain[_INDEX_BYTES:]
        half = len(body) // 2
        self._held[share.sender] = (idx, body[:half], body[half:])

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Shares of each surviving neighbour's seed and each dropped one's mask key.

        Raises:
            SecAggFailure: a neighbour listed as both survivor and dropped (revealing
                both would expose its input), this client not among the survivors, or
                fewer than t survivors.
        """
        self._expect(ClientStage.MASKED)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise SecAggFailure(Failure.PROTOCOL, "a client listed as survivor and as dropped")
        if self.client not in survivors:
            raise SecAggFailure(Failure.PROTOCOL, f"{self.client} sent its input but is not listed")
        if len(survivors) < self.params.threshold:
            raise SecAggFailure(
                Failure.TOO_FEW_INPUTS,
                f"{len(survivors)} survivors, {self.params.threshold} needed",
            )
        seeds = {o: (i, s) for o, (i, s, _) in self._held.items() if o in survivors}
        keys = {o: (i, k) for o, (i, _, k) in self._held.items() if o in dropped}
        self.stage = ClientStage.UNMASKED
        return UnmaskReply(self.client, seeds, keys)
