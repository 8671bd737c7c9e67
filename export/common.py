"""Names shared by the export package: formats, quantisation modes, runtimes, file names.

Defined once here so the exporter, the verifier, the CLI and the edge agent's
loader agree on every string.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterable, Iterator

from takfl.run_layout import EXPORT_REPORT

FORMATS: tuple[str, ...] = ("onnx", "tflite")
QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "dynamic")
RUNTIMES: tuple[str, ...] = ("onnxruntime", "ai-edge-litert", "tflite-runtime")
TORCH_RUNTIME = "torch"

EXTENSIONS: dict[str, str] = {"onnx": ".onnx", "tflite": ".tflite"}
# What each quantisation mode is called in file names and tables.
QUANT_TAGS: dict[str, str] = {"none": "fp32", "int8": "int8", "dynamic": "dynamic"}
# Runtimes able to run each format, in order of preference.
FORMAT_RUNTIMES: dict[str, tuple[str, ...]] = {
    "onnx": ("onnxruntime",),
    "tflite": ("ai-edge-litert", "tflite-runtime"),
}

ONNX_OPSET = 18  # the exporter's native opset (no version conversion); ONNX Runtime >= 1.14
INPUT_NAME = "input"  # (B, C, H, W) float32, normalised as the metadata says
OUTPUT_NAME = "logits"  # (B, num_classes) float32
SIDECAR_SUFFIX = ".json"  # <artifact>.json next to every artifact
REPORT_FILE = EXPORT_REPORT  # in every folder an export fills (takfl.run_layout)
TFLITE_METADATA_NAME = "takfl"  # name of the embedded TFLite metadata entry
ARTIFACT_SCHEMA = 1  # version of the metadata layout below


class ExportError(ValueError):
    """An export request cannot be carried out; the message says what to change."""


class ArtifactError(ExportError):
    """An exported artifact or its sidecar is missing, unreadable or inconsistent."""


def artifact_stem(prototype: str, round_: int, quantization: str) -> str:
    """File stem of one artifact, e.g. ``M-round-10-int8``."""
    return f"{prototype}-round-{round_}-{QUANT_TAGS[quantization]}"


def artifact_filename(prototype: str, round_: int, fmt: str, quantization: str) -> str:
    """File name of one artifact, e.g. ``M-round-10-int8.tflite``."""
    return artifact_stem(prototype, round_, quantization) + EXTENSIONS[fmt]


def format_of(path: str) -> str:
    """The format of an artifact from its extension; :class:`ArtifactError` when unknown."""
    for fmt, ext in EXTENSIONS.items():
        if path.lower().endswith(ext):
            return fmt
    raise ArtifactError(
        f"{path}: unknown artifact type; expected one of {', '.join(EXTENSIONS.values())}"
    )


def parse_choices(value: str | Iterable[str], allowed: Iterable[str], what: str) -> list[str]:
    """Split a comma-separated list (or take a sequence) and check every item.

    Returns the items in the order given, without duplicates; raises
    :class:`ExportError` naming every unknown item and the accepted ones.
    """
    allowed = tuple(allowed)
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in (i.strip().lower() for i in items):
        if item and item not in out:
            out.append(item)
    unknown = [i for i in out if i not in allowed]
    if unknown:
        raise ExportError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    if not out:
        raise ExportError(f"no {what} given; choose from {', '.join(allowed)}")
    return out


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the progress lines and deprecation chatter the converters print.

    Python-level stdout, stderr (progress bars) and warnings only: output of
    native libraries passes, and exceptions propagate as usual.
    """
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield
