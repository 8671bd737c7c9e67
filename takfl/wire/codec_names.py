"""The wire codecs' names and settings, free of torch.

The codec registry (:mod:`takfl.wire.codecs`) holds the units, whose maths needs torch;
a profile or a command line names a codec where torch must not load (an agent's
``validate``, ``profiles``, ``doctor``). So the table of names and the grammar of a codec
choice live here: :func:`parse_codec` turns ``"topk-int8:density=0.02"`` into a
:class:`CodecChoice`, and the registry builds its units against :data:`CODECS`.

A choice is ``name`` or ``name:key=value[,key=value]``. Settings only change how a sender
encodes; a receiver decodes any blob of the named codec, whatever settings made it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from takfl.method_names import unknown_name

# fp32, fp16, int8: one safetensors entry per tensor (codec.py). The others pack every
# tensor of the model into one byte string against the receiver's reference layout.
CODECS: tuple[str, ...] = (
    "fp32",
    "fp16",
    "int8",
    "topk-int8",
    "topk-fp16",
    "sign1",
    "rot2",
    "rot3",
    "rot4",
)

MIN_BLOCK_LOG2, MAX_BLOCK_LOG2 = 3, 12  # blocks of 8 .. 4096 entries
_TOPK: dict[str, float | int] = {"density": 0.03}  # fraction of each tensor's entries sent
_BLOCKS: dict[str, float | int] = {"block": 256}  # entries per scale (and per rotation)

# the settings each codec takes, with their defaults
SETTINGS: dict[str, dict[str, float | int]] = {
    "fp32": {},
    "fp16": {},
    "int8": {},
    "topk-int8": _TOPK,
    "topk-fp16": _TOPK,
    "sign1": _BLOCKS | {"density": 1.0},  # fraction of each tensor's blocks sent
    "rot2": _BLOCKS,
    "rot3": _BLOCKS,
    "rot4": _BLOCKS,
}


class CodecNameError(ValueError):
    """A codec choice names no registered codec or carries a setting it does not take."""


@dataclass(frozen=True)
class CodecChoice:
    """A codec name and the settings its sender encodes with (:func:`parse_codec` fills
    in each codec's defaults; a setting the codec does not take is ignored)."""

    name: str
    density: float = 1.0
    block: int = 256

    def __str__(self) -> str:
        """The canonical text: the name, then the settings it takes, e.g.
        ``topk-int8:density=0.03``; ``fp16`` for codecs without settings."""
        values = {"density": f"{self.density:g}", "block": str(self.block)}
        keys = SETTINGS[self.name]
        if not keys:
            return self.name
        return self.name + ":" + ",".join(f"{k}={values[k]}" for k in keys)


def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CodecNameError(f"density must be a number in (0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise CodecNameError(f"density must be in (0, 1], got {text!r}")
    return value


def _block(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise CodecNameError(f"block must be a power of two, got {text!r}") from None
    lo, hi = 2**MIN_BLOCK_LOG2, 2**MAX_BLOCK_LOG2
    if value < lo or value > hi or value & (value - 1):
        raise CodecNameError(f"block must be a power of two from {lo} to {hi}, got {text!r}")
    return value


_PARSERS = {"density": _density, "block": _block}


def parse_codec(text: str) -> CodecChoice:
    """``name`` or ``name:key=value[,key=value]`` as a :class:`CodecChoice`.

    Raises:
        CodecNameError: an unknown name (the message lists the known ones), a setting
            the codec does not take, or a value out of its range.
    """
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in CODECS:
        raise CodecNameError(unknown_name("compression", name, CODECS))
    values: dict[str, float | int] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in SETTINGS[name]:
            takes = ", ".join(SETTINGS[name]) or "no settings"
            raise CodecNameError(f"{name} takes {takes}; got {item!r}")
        if key in values:
            raise CodecNameError(f"{name}: {key} given twice")
        values[key] = _PARSERS[key](value.strip())
    return CodecChoice(name, **(SETTINGS[name] | values))  # type: ignore[arg-type]
