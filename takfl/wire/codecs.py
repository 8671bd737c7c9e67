"""The wire codecs, each a registered unit resolved once at the entry point.

A unit records its name, where it comes from, whether its sender keeps an error-feedback
residual, and three functions: encode (a delta and the sender's settings in, bytes out),
decode (bytes and the receiver's reference state in, the delta out, every field checked
against its bounds before anything beyond the reference's size is allocated) and the
largest blob it can produce for a reference. :func:`resolve_codec` turns a choice such as
``"topk-int8:density=0.02"`` into one :class:`Codec`; :func:`decode_blob` picks the unit a
received blob names. Nothing downstream dispatches on a name.

Error feedback (Karimireddy et al. 2019, "Error feedback fixes SignSGD") is the pure
:func:`encode_with_feedback`: the residual of what was not sent goes in, is added to this
round's delta before encoding, and what the receiver will not reconstruct comes out as the
next residual; so the updates sent plus the last residual add up to the true updates.

``fp32``, ``fp16`` and ``int8`` are the per-tensor safetensors codecs of
:mod:`takfl.wire.codec`, byte for byte; the others pack the whole model into one compact payload
(:mod:`takfl.wire.packing`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from takfl.method_names import registry
from takfl.state import State, StateView
from takfl.wire import rotation, sign, topk
from takfl.wire.codec import (
    CODEC_KEY,
    CODEC_VERSION,
    decode_state,
    encode_state,
    max_encoded_bytes,
    read_header,
)
from takfl.wire.codec_names import CODECS, CodecChoice, CodecNameError, parse_codec
from takfl.wire.errors import CodecError
from takfl.wire.packing import packed_codec
from takfl.wire.sections import fed_back

log = logging.getLogger(__name__)

# encode(delta, base, choice, seed) -> blob; decode(blob, base, max_bytes) -> delta
Encode = Callable[[StateView, StateView, CodecChoice, int], bytes]
Decode = Callable[[bytes, StateView, "int | None"], State]


@dataclass(frozen=True, kw_only=True)
class CodecUnit:
    name: str
    reference: str
    error_feedback: bool  # the sender keeps the residual of what it did not send
    encode: Encode
    decode: Decode
    max_bytes: Callable[[StateView], int]  # bound on any blob for a reference layout


@dataclass(frozen=True)
class Codec:
    """One resolved codec: its unit and the settings its sender encodes with."""

    unit: CodecUnit
    choice: CodecChoice

    @property
    def name(self) -> str:
        return self.unit.name

    @property
    def error_feedback(self) -> bool:
        return self.unit.error_feedback

    def __str__(self) -> str:
        return str(self.choice)

    def encode(self, delta: StateView, base: StateView, *, seed: int = 0) -> bytes:
        """``delta`` (of a model against ``base``, the state both ends hold) as this
        codec's blob; ``seed`` feeds codecs that randomise (rot*)."""
        return self.unit.encode(delta, base, self.choice, seed)

    def decode(self, blob: bytes, base: StateView, *, max_bytes: int | None = None) -> State:
        """The delta in ``blob`` (which must be this codec's) against ``base``, whose
        layout it must have; floating entries float32."""
        return self.unit.decode(blob, base, max_bytes)

    def max_bytes(self, reference: StateView) -> int:
        return self.unit.max_bytes(reference)


def _tensor_unit(name: str, reference: str) -> CodecUnit:
    return CodecUnit(
        name=name,
        reference=reference,
        error_feedback=False,
        encode=lambda delta, base, choice, seed: encode_state(delta, name),
        decode=lambda blob, ref, cap: _decode_tensors(blob, name, cap),
        max_bytes=max_encoded_bytes,
    )


def _decode_tensors(blob: bytes, name: str, cap: int | None) -> State:
    if blob_codec(blob) != name:
        raise CodecError(f"not a {name} blob")
    return decode_state(blob, max_bytes=cap)


_EF = "with error feedback (Karimireddy et al. 2019)"


def _topk_unit(values: str) -> CodecUnit:
    return CodecUnit(
        name=f"topk-{values}",
        reference=f"top-k sparsification (DGC, Lin et al. 2018), {values} values, {_EF}",
        error_feedback=True,
        encode=lambda delta, base, choice, seed: topk.encode(
            delta, base, values=values, density=choice.density
        ),
        decode=lambda blob, ref, cap: topk.decode(blob, ref, values=values, max_bytes=cap),
        max_bytes=lambda ref: topk.max_bytes(ref, values=values),
    )


def _sign_unit() -> CodecUnit:
    return CodecUnit(
        name="sign1",
        reference="1-bit sign with a mean-magnitude scale per block (signSGD; below density 1 "
        f"a seeded random subset, Stich et al. 2018), {_EF}",
        error_feedback=True,
        encode=lambda delta, base, choice, seed: sign.encode(
            delta, base, block=choice.block, density=choice.density, seed=seed
        ),
        decode=lambda blob, ref, cap: sign.decode(blob, ref, max_bytes=cap),
        max_bytes=sign.max_bytes,
    )


def _rotation_unit(bits: int) -> CodecUnit:
    return CodecUnit(
        name=f"rot{bits}",
        reference=f"randomised Hadamard rotation, {bits}-bit uniform quantiser with a step "
        f"per block (Suresh et al. 2017; Flower's compression mod), {_EF}",
        error_feedback=True,
        encode=lambda delta, base, choice, seed: rotation.encode(
            delta, base, bits=bits, block=choice.block, seed=seed
        ),
        decode=lambda blob, ref, cap: rotation.decode(blob, ref, bits=bits, max_bytes=cap),
        max_bytes=lambda ref: rotation.max_bytes(ref, bits=bits),
    )


_UNITS: dict[str, CodecUnit] = registry(
    "codec",
    CODECS,
    (
        _tensor_unit("fp32", "float32 per tensor, exact"),
        _tensor_unit("fp16", "float16 per tensor"),
        _tensor_unit("int8", "int8 per tensor with one float32 scale"),
        _topk_unit("int8"),
        _topk_unit("fp16"),
        _sign_unit(),
        *(_rotation_unit(b) for b in (2, 3, 4)),
    ),
    lambda unit: unit.name,
)


def codec_units() -> dict[str, CodecUnit]:
    return dict(_UNITS)


def resolve_codec(choice: str | CodecChoice) -> Codec:
    """The codec a choice names (``"topk-int8:density=0.02"``, ``"fp16"``, ...).

    Raises:
        CodecNameError: an unknown name (listing the known ones) or a bad setting.
    """
    parsed = parse_codec(choice) if isinstance(choice, str) else choice
    return Codec(_UNITS[parsed.name], parsed)


def blob_codec(blob: bytes) -> str:
    """The codec name a blob declares: a packed blob's name, a safetensors blob's
    metadata tag (not checked against the registry).

    Raises:
        CodecError: neither.
    """
    packed = packed_codec(blob)
    if packed is not None:
        return packed
    meta, _ = read_header(blob)
    tag = meta.get(CODEC_KEY)
    version, _, name = tag.partition(":") if isinstance(tag, str) else ("", "", "")
    if version != CODEC_VERSION:
        raise CodecError(f"not a takfl codec v{CODEC_VERSION} blob (metadata {meta!r:.200})")
    return name


def decode_blob(blob: bytes, base: StateView, *, max_bytes: int | None = None) -> State:
    """Decode a blob of any registered codec against ``base``.

    Raises:
        CodecError: an unknown codec, or whatever the codec's decoder refuses.
    """
    if max_bytes is not None and len(blob) > max_bytes:
        raise CodecError(f"blob of {len(blob)} bytes exceeds the {max_bytes}-byte cap")
    name = blob_codec(blob)
    unit = _UNITS.get(name)
    if unit is None:
        raise CodecError(f"blob of unknown codec {name!r}")
    return unit.decode(blob, base, max_bytes)


# -- error feedback ------------------------------------------------------------------------
@dataclass(frozen=True)
class Sent:
    """One encoded update: the blob, the delta the receiver reconstructs from it, and the
    residual to add to the next round's delta."""

    blob: bytes
    delta: State
    residual: State  # the fed-back entries (floating, not running statistics), float32


def check_residual(residual: StateView, delta: StateView) -> None:
    """A residual fits ``delta``: one float32 entry of the same shape per fed-back entry
    (:func:`takfl.wire.sections.fed_back`).

    Raises:
        CodecError: it does not (the model changed shape: drop the residual).
    """
    names = fed_back(delta)
    if set(residual) != set(names):
        raise CodecError("residual entries differ from the model's fed-back entries")
    for k in names:
        if residual[k].shape != delta[k].shape:
            raise CodecError(f"residual {k} has shape {tuple(residual[k].shape)}")


def encode_with_feedback(
    codec: Codec,
    delta: StateView,
    base: StateView,
    residual: StateView | None,
    *,
    seed: int = 0,
) -> Sent:
    """Encode ``delta + residual`` (against ``base``; None: no residual yet) and return
    what was sent with the new residual ``(delta + residual) - decoded`` of the fed-back
    entries (running statistics are never fed back).

    Pure. Summed over rounds, ``decoded`` deltas + the last residual = the true deltas
    (up to float32 rounding) on every fed-back entry.
    """
    if residual is not None:
        check_residual(residual, delta)
    names = fed_back(delta)
    corrected: State = dict(delta)
    for k in names:
        x = delta[k].detach().to(torch.float32)
        corrected[k] = x + residual[k] if residual is not None else x
    blob = codec.encode(corrected, base, seed=seed)
    decoded = codec.decode(blob, base)
    return Sent(blob, decoded, {k: corrected[k] - decoded[k] for k in names})


def send_delta(
    codec: Codec,
    delta: StateView,
    base: StateView,
    residual: StateView | None,
    *,
    seed: int = 0,
) -> tuple[bytes, State, State | None]:
    """What a sender sends of ``delta`` (against ``base``): the blob, the delta the
    receiver reconstructs, and the residual to keep for the next one (None for a codec
    without error feedback). A residual that no longer fits (the model changed shape) is
    dropped with a log line."""
    if not codec.error_feedback:
        blob = codec.encode(delta, base, seed=seed)
        return blob, codec.decode(blob, base), None
    if residual is not None:
        try:
            check_residual(residual, delta)
        except CodecError as e:
            log.warning("error-feedback residual dropped: %s", e)
            residual = None
    sent = encode_with_feedback(codec, delta, base, residual, seed=seed)
    return sent.blob, sent.delta, sent.residual


__all__ = [
    "Codec",
    "CodecNameError",
    "CodecUnit",
    "Sent",
    "codec_units",
    "decode_blob",
    "encode_with_feedback",
    "resolve_codec",
    "send_delta",
]
