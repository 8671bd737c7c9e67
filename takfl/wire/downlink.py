"""The global model on its way down: the full model, or a codec's delta against a model
the receiver already holds (pure: states and bytes in, states and bytes out).

A model is named by its **model digest**: the SHA-256 of its fp32 encoding
(:func:`model_digest`), which for a full model is the digest of the very blob that goes
down. A delta goes against a model the agent is known to hold (the base of its last
accepted update); the coordinator decodes its own blob against that base, and the
reconstruction (not the coordinator's exact global) is the model the agent trains from
and whose digest the signed task names. So nothing drifts: the next round's delta is
taken against what the agent really holds, and whatever a lossy codec left out one round
is in the next round's delta (the downlink needs no residual of its own).

The receiver decodes the delta against the model it holds under the task's base digest,
recomputes the model digest of the result and refuses the task (``wrong_base`` when it
does not hold the base, ``digest_mismatch`` when the reconstruction differs) so that the
coordinator sends the full model instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from takfl.state import State, StateView
from takfl.wire.codec import apply_delta, decode_state, encode_state, make_delta
from takfl.wire.codecs import Codec, decode_blob
from takfl.wire.errors import CodecError

FULL_ENCODING = "fp32"  # a full global model travels uncompressed


def full_blob(state: StateView) -> bytes:
    """The full model as it goes down (and as its model digest is computed)."""
    return encode_state(state, FULL_ENCODING)


def model_digest(state: StateView) -> str:
    """The SHA-256 (hex) of the model's fp32 encoding: what a task and an update name."""
    return hashlib.sha256(full_blob(state)).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Downlink:
    """What goes down to the agents that hold ``base`` (None: the full model)."""

    blob: bytes
    base: str | None  # model digest the blob is a delta against; None: blob is the model
    state: State  # the model the receiver holds after it, floating entries float32
    digest: str  # its model digest


def full_downlink(global_state: StateView) -> Downlink:
    blob = full_blob(global_state)
    state = decode_state(blob)  # exactly what the receiver decodes
    return Downlink(blob=blob, base=None, state=state, digest=hashlib.sha256(blob).hexdigest())


def delta_downlink(
    global_state: StateView,
    base_state: StateView,
    base_digest: str,
    codec: Codec,
    *,
    seed: int = 0,
) -> Downlink:
    """``global_state - base_state`` through ``codec``, and the model the receiver will
    reconstruct from it. Raises :class:`CodecError` when the layouts differ."""
    delta = make_delta(
        {k: v.detach().to("cpu") for k, v in global_state.items()},
        base_state,
    )
    blob = codec.encode(delta, base_state, seed=seed)
    state = reconstruct(blob, base_state)
    return Downlink(blob=blob, base=base_digest, state=state, digest=model_digest(state))


def reconstruct(blob: bytes, base_state: StateView, *, max_bytes: int | None = None) -> State:
    """The model a delta blob (of any registered codec) makes of ``base_state``; floating
    entries float32. Raises :class:`CodecError` for a blob that does not fit the base."""
    delta = decode_blob(blob, base_state, max_bytes=max_bytes)
    out = apply_delta(base_state, delta)
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in out.items()}


def received_model(
    blob: bytes,
    *,
    base: str | None,
    expected: str,
    held: StateView | None,
    max_bytes: int | None = None,
) -> State:
    """The model a task's blob gives the receiver: the full model (``base`` None) or the
    delta applied to ``held`` (the model it holds under ``base``), checked against the
    task's model digest ``expected``.

    Raises:
        CodecError: undecodable, or a delta that does not fit ``held``.
        BaseUnknown: a delta, and the receiver holds no model under ``base``.
        ModelMismatch: the result's digest is not ``expected``.
    """
    if base is None:
        if hashlib.sha256(blob).hexdigest() != expected:
            raise ModelMismatch("the full model's digest is not the task's")
        return decode_state(blob, max_bytes=max_bytes)
    if held is None:
        raise BaseUnknown(f"no model {base[:12]} held to apply the delta to")
    state = reconstruct(blob, held, max_bytes=max_bytes)
    got = model_digest(state)
    if got != expected:
        raise ModelMismatch(f"reconstructed model {got[:12]}, the task names {expected[:12]}")
    return state


class BaseUnknown(CodecError):
    """A delta against a model the receiver does not hold."""


class ModelMismatch(CodecError):
    """A reconstructed model whose digest is not the one the task was signed with."""


__all__ = [
    "BaseUnknown",
    "Downlink",
    "ModelMismatch",
    "delta_downlink",
    "full_blob",
    "full_downlink",
    "model_digest",
    "received_model",
    "reconstruct",
]
