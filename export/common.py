"""Names shared by the export package: quantisation modes, tensor and file names.

Defined once here so the exporter, the verifier, the CLI and the edge agent's
loader agree on every string. The formats themselves, with their suffixes and
runtimes, are units of :mod:`export.formats`.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterable, Iterator

from takfl.run_layout import EXPORT_REPORT

QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "dynamic")
TORCH_RUNTIME = "torch"  # PyTorch eager: the reference row, and a profile that runs it

# What each quantisation mode is called in file names and tables.
QUANT_TAGS: dict[str, str] = {"none": "fp32", "int8": "int8", "dynamic": "dynamic"}

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
