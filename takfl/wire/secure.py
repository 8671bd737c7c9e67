"""The messages of secure aggregation (SecAgg+, ``privacy.mode: secagg``).

A task of a secure round carries :class:`SecAggTask` (``task.secagg``): the agent's
neighbours in the masking graph, the threshold, the number of sampled clients, the
group and the clipping bound. After training, the agent and the coordinator exchange,
per prototype and round (each message signed with the agent's secret, like every
control message)::

    agent -> up/secagg_keys          SecAggKeys      two fresh X25519 public keys
    coordinator -> down/secagg_roster SecAggRoster   its neighbours' keys (those that sent them)
    agent -> up/secagg_shares        SecAggShares    its secrets' shares, sealed per neighbour
    coordinator -> down/secagg_shares SecAggDelivery the shares its neighbours sealed to it
    agent -> up/update (+ up/chunk)  UpdateHeader    the masked input, as an update blob
    coordinator -> down/secagg_unmask SecAggUnmask   which neighbours sent inputs, which not
    agent -> up/secagg_reveal        SecAggReveal    the shares that unmask the sum

The masked input is an ordinary update (header, chunks, ack): its blob is ``length``
little-endian words of ``bits`` bits, and its ``compression`` is the task's (``fp32``
in a secure round; the blob is read by the ``secagg`` rules alone). The maths is
:mod:`takfl.secagg`; ``docs/protocol.md`` ("Secure aggregation") has every byte.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from takfl.wire.envelope import SignedMessage, Strict
from takfl.wire.messages import MAX_NEIGHBOURS, Ident, NonNegInt, SecAggTask

PUBLIC_KEY = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]  # X25519, 32 bytes
# AES-GCM: a 12-byte nonce, the sealed 2-byte index and two 32-byte share strings, a 16-byte tag
SEALED_SHARE = Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{2}){28,256}$")]
SHARE = Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{2}){16,128}$")]  # Shamir pieces


class _SecureRoundMessage(SignedMessage):
    agent_id: Ident
    round_id: NonNegInt
    prototype: Ident


class PublicKeys(Strict):
    channel_key: PUBLIC_KEY  # seals shares between neighbours
    mask_key: PUBLIC_KEY  # agrees the pairwise mask seeds


class SecAggKeys(_SecureRoundMessage):
    """Stage 0, agent -> coordinator: its two fresh public keys for this round."""

    kind: Literal["secagg_keys"] = "secagg_keys"
    channel_key: PUBLIC_KEY
    mask_key: PUBLIC_KEY


class SecAggRoster(_SecureRoundMessage):
    """Stage 0 closed, coordinator -> agent: the public keys of its neighbours that sent
    theirs in time."""

    kind: Literal["secagg_roster"] = "secagg_roster"
    keys: Annotated[dict[Ident, PublicKeys], Field(max_length=MAX_NEIGHBOURS)]


class SecAggShares(_SecureRoundMessage):
    """Stage 1, agent -> coordinator: for each neighbour in its roster, the shares of its
    self-mask seed and mask private key, sealed to that neighbour."""

    kind: Literal["secagg_shares"] = "secagg_shares"
    shares: Annotated[dict[Ident, SEALED_SHARE], Field(max_length=MAX_NEIGHBOURS)]


class SecAggDelivery(_SecureRoundMessage):
    """Stage 1 closed, coordinator -> agent: the shares sealed to it, by sender (only of
    senders that shared in time); an agent masks with exactly these senders."""

    kind: Literal["secagg_delivery"] = "secagg_delivery"
    shares: Annotated[dict[Ident, SEALED_SHARE], Field(max_length=MAX_NEIGHBOURS)]


class SecAggUnmask(_SecureRoundMessage):
    """Stage 2 closed, coordinator -> agent: which of its neighbours' masked inputs
    arrived (``survivors``: reveal their seed shares) and which neighbours shared but
    sent no input (``dropped``: reveal their mask-key shares); ``inputs``: how many
    inputs the round has in all."""

    kind: Literal["secagg_unmask"] = "secagg_unmask"
    survivors: Annotated[list[Ident], Field(max_length=MAX_NEIGHBOURS + 1)]
    dropped: Annotated[list[Ident], Field(max_length=MAX_NEIGHBOURS)]
    inputs: Annotated[int, Field(ge=0, le=1_000_000)]


class RevealedShare(Strict):
    index: Annotated[int, Field(ge=1, le=65535)]  # the holder's Shamir x coordinate
    share: SHARE  # the 16-byte pieces' shares, concatenated


class SecAggReveal(_SecureRoundMessage):
    """Stage 3, agent -> coordinator: the shares it holds of each surviving neighbour's
    seed (and its own) and of each dropped neighbour's mask key; never both of one."""

    kind: Literal["secagg_reveal"] = "secagg_reveal"
    seeds: Annotated[dict[Ident, RevealedShare], Field(max_length=MAX_NEIGHBOURS + 1)]
    keys: Annotated[dict[Ident, RevealedShare], Field(max_length=MAX_NEIGHBOURS)]

    @model_validator(mode="after")
    def _one_secret_each(self) -> SecAggReveal:
        both = set(self.seeds) & set(self.keys)
        if both:
            raise ValueError(f"seed and key of one client revealed: {sorted(both)[:3]}")
        return self


SECURE_COMPRESSION = "fp32"  # a secure round's task and update compression (not applied)

SECURE_MESSAGES: tuple[type[SignedMessage], ...] = (
    SecAggKeys,
    SecAggRoster,
    SecAggShares,
    SecAggDelivery,
    SecAggUnmask,
    SecAggReveal,
)
__all__ = [
    "SECURE_COMPRESSION",
    "SECURE_MESSAGES",
    "PublicKeys",
    "RevealedShare",
    "SecAggDelivery",
    "SecAggKeys",
    "SecAggReveal",
    "SecAggRoster",
    "SecAggShares",
    "SecAggTask",
    "SecAggUnmask",
]
