"""The export formats, each a registered unit resolved once at the entry point.

A unit (:class:`FormatUnit`) records its name, file suffix, float exporter, quantisers,
the runtimes that run it and how to load it in them, how its metadata is embedded and
read back, and its verifier. :func:`resolve_format` / :func:`resolve_formats` turn names
(``--formats``, a device profile) into units; :func:`unit_for_path` finds the unit of an
artifact file. Nothing downstream dispatches on a format's name.

``import export.formats`` is cheap: it loads no converter, no runtime, not torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from export.common import TORCH_RUNTIME, ArtifactError, ExportError, parse_choices
from export.formats import executorch, executorch_training, onnx, tflite
from export.formats.unit import (
    FLOAT,
    BuildJob,
    Built,
    FormatUnit,
    RuntimeSpec,
    VerifyJob,
)

__all__ = [
    "DEFAULT_FORMATS",
    "FLOAT",
    "BuildJob",
    "Built",
    "FormatUnit",
    "RuntimeSpec",
    "VerifyJob",
    "artifact_filename",
    "format_names",
    "format_of",
    "format_units",
    "profile_format",
    "resolve_format",
    "resolve_formats",
    "runtime_specs",
    "unit_for_path",
]

_UNITS: dict[str, FormatUnit] = {
    u.name: u for u in (onnx.UNIT, tflite.UNIT, executorch.UNIT, executorch_training.UNIT)
}
DEFAULT_FORMATS: tuple[str, ...] = (onnx.UNIT.name, tflite.UNIT.name)  # takfl-export's default
# A device profile whose inference.format is "torch" runs PyTorch itself; it gets the
# portable float ONNX artifact.
_PROFILE_ALIASES = {TORCH_RUNTIME: onnx.UNIT.name}


def format_units() -> dict[str, FormatUnit]:
    return dict(_UNITS)


def format_names() -> tuple[str, ...]:
    return tuple(_UNITS)


def resolve_format(name: str | FormatUnit) -> FormatUnit:
    """The unit called ``name`` (a unit is returned as it is).

    Raises:
        ExportError: an unknown name; the message lists the known ones.
    """
    if isinstance(name, FormatUnit):
        return name
    unit = _UNITS.get(name.strip().lower())
    if unit is None:
        raise ExportError(f"unknown format {name}; choose from {', '.join(_UNITS)}")
    return unit


def resolve_formats(value: str | Iterable[str | FormatUnit]) -> tuple[FormatUnit, ...]:
    """Units of a comma-separated list or a sequence of names (units pass as they are), in
    the order given, without duplicates; :class:`ExportError` naming every unknown name
    and the known ones, or when none is given."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [i for i in items if isinstance(i, str)]
    if names or not items:
        parse_choices(names, _UNITS, "format")  # names every unknown one, or none given
    units = [
        _UNITS[i.strip().lower()] if isinstance(i, str) else i
        for i in items
        if not isinstance(i, str) or i.strip()
    ]
    return tuple({u.name: u for u in units}.values())


def profile_format(fmt: str) -> FormatUnit:
    """The unit a device profile's ``inference.format`` asks for (``torch``: ONNX)."""
    return resolve_format(_PROFILE_ALIASES.get(fmt, fmt))


def unit_for_path(path: str | Path) -> FormatUnit:
    """The unit whose suffix ends the file's name (case-insensitive, longest suffix first);
    :class:`ArtifactError` when none does."""
    name = Path(path).name.lower()
    for unit in sorted(_UNITS.values(), key=lambda u: -len(u.suffix)):
        if name.endswith(unit.suffix):
            return unit
    raise ArtifactError(
        f"{path}: unknown artifact type; expected one of "
        f"{', '.join(u.suffix for u in _UNITS.values())}"
    )


def format_of(path: str | Path) -> str:
    """The format name of an artifact from its file name; :class:`ArtifactError` when unknown."""
    return unit_for_path(path).name


def artifact_filename(prototype: str, round_: int, fmt: str, quantization: str) -> str:
    """File name of one artifact, e.g. ``M-round-10-int8.tflite``."""
    return resolve_format(fmt).filename(prototype, round_, quantization)


def runtime_specs() -> dict[str, RuntimeSpec]:
    """Every runtime some format runs in, by name, in the formats' order of preference."""
    return {r.name: r for unit in _UNITS.values() for r in unit.runtimes}
