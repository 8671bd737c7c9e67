"""The server's side of one SecAgg+ round, as a state machine:
keys -> shares -> masked inputs -> unmasking -> the sum (or a failure with its reason).

The server keeps the running sum of masked inputs (never an input by itself: each
arrives masked and is added to the sum at once), the public keys, the sealed shares it
routes (it cannot open them), and in the last stage the recovered seeds of survivors
and mask keys of dropouts. Semi-honest model: a server that lies about who dropped
(telling some clients a survivor dropped) is caught only where one client sees both
lists; Bell et al.'s consistency round against that is not implemented here.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import numpy as np

from takfl.secagg.crypto import SecAggCryptoError, combine_secret, expand_mask
from takfl.secagg.masks import apply_mask, pair_sign, pairwise_mask
from takfl.secagg.messages import (
    MIN_INPUTS,
    Failure,
    KeysAdvert,
    MaskedInput,
    RoundParams,
    SealedShare,
    SecAggFailure,
    UnmaskReply,
    UnmaskRequest,
)


class ServerStage(Enum):
    KEYS = "keys"
    SHARES = "shares"
    INPUTS = "inputs"
    UNMASKING = "unmasking"
    DONE = "done"
    FAILED = "failed"


class SecAggServer:
    """The coordinator's state for one prototype's round."""

    def __init__(self, params: RoundParams) -> None:
        self.params = params
        self.stage = ServerStage.KEYS
        self.failure: SecAggFailure | None = None
        self.keys: dict[str, tuple[bytes, bytes]] = {}  # U1: client -> (channel, mask) keys
        self.routed: dict[str, list[SealedShare]] = {}  # receiver -> sealed shares
        self.shared: set[str] = set()  # U2
        self.masked_sum: np.ndarray | None = None  # sum of masked inputs, mod 2^bits
        self.inputs: set[str] = set()  # U3
        self.replies: dict[str, UnmaskReply] = {}

    # -- helpers ---------------------------------------------------------------------------
    def _expect(self, stage: ServerStage) -> None:
        if self.stage is not stage:
            raise SecAggFailure(
                Failure.PROTOCOL, f"server: expected stage {stage.value}, at {self.stage.value}"
            )

    def _fail(self, reason: Failure, detail: str) -> SecAggFailure:
        self.stage = ServerStage.FAILED
        self.failure = SecAggFailure(reason, detail)
        return self.failure

    def _need(self, have: int, reason: Failure, what: str) -> None:
        if have < self.params.threshold:
            raise self._fail(reason, f"{have} {what}, at least {self.params.threshold} needed")

    # -- stage 0: keys ---------------------------------------------------------------------
    def add_keys(self, advert: KeysAdvert) -> None:
        self._expect(ServerStage.KEYS)
        if advert.client not in self.params.clients or advert.client in self.keys:
            raise SecAggFailure(Failure.PROTOCOL, f"unexpected keys from {advert.client}")
        self.keys[advert.client] = (advert.channel_key, advert.mask_key)

    def rosters(self) -> dict[str, dict[str, tuple[bytes, bytes]]]:
        """Close stage 0: each advertiser -> its advertising neighbours' public keys."""
        self._expect(ServerStage.KEYS)
        self._need(len(self.keys), Failure.TOO_FEW_KEYS, "clients advertised keys")
        self.stage = ServerStage.SHARES
        return {
            c: {n: self.keys[n] for n in self.params.neighbours_of(c) if n in self.keys}
            for c in self.keys
        }

    # -- stage 1: shares -------------------------------------------------------------------
    def add_shares(self, sender: str, shares: list[SealedShare]) -> None:
        self._expect(ServerStage.SHARES)
        if sender not in self.keys or sender in self.shared:
            raise SecAggFailure(Failure.PROTOCOL, f"unexpected shares from {sender}")
        if any(s.sender != sender or s.receiver not in self.keys for s in shares):
            raise SecAggFailure(Failure.PROTOCOL, f"{sender} sent a share under another name")
        self.shared.add(sender)
        for s in shares:
            self.routed.setdefault(s.receiver, []).append(s)

    def deliveries(self) -> dict[str, list[SealedShare]]:
        """Close stage 1: each client that shared -> the shares sent to it by others that did."""
        self._expect(ServerStage.SHARES)
        self._need(len(self.shared), Failure.TOO_FEW_SHARES, "clients shared their keys")
        self.stage = ServerStage.INPUTS
        return {
            c: [s for s in self.routed.get(c, []) if s.sender in self.shared] for c in self.shared
        }

    # -- stage 2: masked inputs ------------------------------------------------------------
    def add_input(self, msg: MaskedInput) -> None:
        """Fold a masked input into the running sum (the message is not kept)."""
        self._expect(ServerStage.INPUTS)
        p = self.params
        if msg.client not in self.shared or msg.client in self.inputs:
            raise SecAggFailure(Failure.PROTOCOL, f"unexpected masked input from {msg.client}")
        dtype = p.encoding.dtype
        masked = np.asarray(msg.masked)
        if masked.dtype != dtype or masked.shape != (p.length,):
            raise SecAggFailure(Failure.PROTOCOL, f"{msg.client}'s masked input is malformed")
        self.masked_sum = masked.copy() if self.masked_sum is None else self.masked_sum + masked
        self.inputs.add(msg.client)

    def unmask_request(self) -> UnmaskRequest:
        """Close stage 2: who sent an input, and who shared keys but sent no input."""
        self._expect(ServerStage.INPUTS)
        self._need(len(self.inputs), Failure.TOO_FEW_INPUTS, "masked inputs arrived")
        if len(self.inputs) < MIN_INPUTS:  # the sum of one client is its update
            raise self._fail(
                Failure.TOO_FEW_INPUTS,
                f"{len(self.inputs)} masked input, at least {MIN_INPUTS} needed for a sum",
            )
        self.stage = ServerStage.UNMASKING
        return UnmaskRequest(tuple(sorted(self.inputs)), tuple(sorted(self.shared - self.inputs)))

    # -- stage 3: unmasking ----------------------------------------------------------------
    def add_unmasking(self, reply: UnmaskReply) -> None:
        self._expect(ServerStage.UNMASKING)
        if reply.client not in self.inputs or reply.client in self.replies:
            raise SecAggFailure(Failure.PROTOCOL, f"unexpected unmasking from {reply.client}")
        if set(reply.seed_shares) & set(reply.key_shares):
            raise SecAggFailure(Failure.PROTOCOL, f"{reply.client} revealed seed and key of one")
        self.replies[reply.client] = reply

    def _recover(
        self, owner: str, what: str, held: Callable[[UnmaskReply], dict[str, tuple[int, bytes]]]
    ) -> bytes:
        """``owner``'s secret from the replies' shares of it (``held`` picks which kind)."""
        shares = [held(r)[owner] for r in self.replies.values() if owner in held(r)]
        try:
            return combine_secret(shares, self.params.threshold)
        except SecAggCryptoError as e:
            raise self._fail(Failure.TOO_FEW_UNMASKING, f"the {what} of {owner}: {e}") from e

    def result(self) -> np.ndarray:
        """Close stage 3: the sum of the survivors' updates (float64, ``params.length``),
        within ``params.encoding.max_error(n)`` of the true sum per coordinate.

        Raises:
            SecAggFailure: a survivor's seed or a dropout's key lacks t shares.
        """
        self._expect(ServerStage.UNMASKING)
        p = self.params
        enc = p.encoding
        if self.masked_sum is None:
            raise self._fail(Failure.TOO_FEW_INPUTS, "no masked input")
        total = self.masked_sum.copy()
        for owner in sorted(self.inputs):
            total = total - expand_mask(
                self._recover(owner, "self-mask seed", _seeds), p.length, enc.dtype
            )
        for owner in sorted(self.shared - self.inputs):
            key = self._recover(owner, "mask key", _keys)
            for peer in p.neighbours_of(owner):
                if peer in self.inputs:  # it masked with the dropout: take its mask off
                    mask = pairwise_mask(key, self.keys[peer][1], p.context, p.length, enc.dtype)
                    total = apply_mask(total, mask, -pair_sign(peer, owner))
        self.stage = ServerStage.DONE
        return enc.decode(total)


def _seeds(reply: UnmaskReply) -> dict[str, tuple[int, bytes]]:
    return reply.seed_shares


def _keys(reply: UnmaskReply) -> dict[str, tuple[int, bytes]]:
    return reply.key_shares
