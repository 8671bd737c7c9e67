"""What a format unit is: how one kind of artifact is exported, quantised, stamped, run and
verified, as data the pipeline reads (no dispatch on a format's name anywhere else).

This module imports only the standard library: the types of torch tensors, models and
metadata are annotations. Every step that needs a converter or a runtime imports it
inside the function that uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.common import INPUT_NAME, OUTPUT_NAME, QUANT_TAGS, QUANTIZATIONS, ExportError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from export.metadata import ArtifactMetadata
    from export.runtimes import Runner
    from export.verify import Reference, VerifyRow
    from takfl.checkpoint import CheckpointMeta
    from takfl.config.profile import TrainingSpec

FLOAT = "none"  # the quantisation every format has: its float exporter


@dataclass(frozen=True)
class RuntimeSpec:
    """A runtime that runs artifacts: its name, the module importing it proves it is
    usable, and how to install it when it is not."""

    name: str
    module: str
    install: str


@dataclass(kw_only=True)
class Built:
    """An artifact on disk and what its graph looks like."""

    path: Path
    batch: int | None  # the graph's fixed batch size; None when dynamic
    opset: int | None = None  # ONNX opset; None for other formats
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    notes: list[str] = field(default_factory=list)
    # format-specific sidecar fields known at build time (a program's parameters, parity)
    sidecar: dict[str, Any] = field(default_factory=dict)
    check: str = ""  # what the build-time check measured, one line (programs); "" when none

    def variant(self, path: Path, notes: list[str]) -> Built:
        """A quantised artifact made from this one: the same graph interface, its own file."""
        return Built(
            path=path,
            batch=self.batch,
            opset=self.opset,
            input_name=self.input_name,
            output_name=self.output_name,
            notes=notes,
        )


@dataclass(frozen=True, kw_only=True)
class BuildJob:
    """What a float exporter gets for one artifact of one checkpoint."""

    model: nn.Module  # eval mode: (B, C, H, W) float32 -> (B, classes) logits
    meta: CheckpointMeta  # identity and input shape of the checkpoint
    path: Path  # where the artifact goes
    sample: torch.Tensor  # (B, C, H, W) real inputs that trace the graph
    check_x: torch.Tensor  # (N, C, H, W) real samples for checks made while building
    check_y: torch.Tensor  # (N,) int64 their labels
    training: TrainingSpec | None = None  # the prototype's local training (training programs)
    slim: bool = True  # ONNX: onnxslim when installed
    dynamic_batch: bool = True  # ONNX: symbolic batch dimension when the exporter manages it


@dataclass(frozen=True, kw_only=True)
class VerifyJob:
    """What a verifier gets: the reference outputs and how to measure against them."""

    unit: FormatUnit
    quantization: str
    prototype: str
    reference: Reference  # real inputs and PyTorch's logits on them
    threads: int
    latency_iters: int
    parity_tolerance: float | None  # float artifacts: beyond it MISMATCH; None: not checked


FloatExporter = Callable[[BuildJob], Built]
# (float artifact, destination, calibration inputs (N, C, H, W), threads) -> quantised artifact
Quantizer = Callable[[Built, Path, "torch.Tensor", int], Built]
# (artifact, its metadata) -> the format's own sidecar fields; embeds the metadata where it can
Stamper = Callable[[Built, "ArtifactMetadata"], dict[str, Any]]
EmbeddedReader = Callable[[Path], "ArtifactMetadata | None"]
# (path, runtime, threads, metadata, execution providers) -> a loaded artifact
Loader = Callable[..., "Runner"]
Verifier = Callable[[Built, VerifyJob], "list[VerifyRow]"]


@dataclass(frozen=True, kw_only=True, eq=False)
class FormatUnit:
    """One export format: name, file suffix, float exporter, quantisers by quantisation
    name, the runtimes that run it (in order of preference) and how to load it in them,
    how its metadata is embedded and read back (a sidecar is always written), and its
    verifier."""

    name: str  # as in --formats, device profiles and the sidecar's "format"
    title: str  # what it is, for people: "ONNX model", "training program"
    suffix: str  # how its file names end: ".onnx", "-train.pte"
    quantization_in_name: bool  # file names carry the quantisation tag (fp32, int8...)
    export: FloatExporter
    quantizers: Mapping[str, Quantizer]  # every quantisation but "none"
    runtimes: tuple[RuntimeSpec, ...]
    load: Loader | None  # None: the artifact does not run inference (a training program)
    stamp: Stamper
    read_embedded: EmbeddedReader
    verify: Verifier
    needs_training: bool = False  # its exporter needs the prototype's training settings

    @property
    def quantizations(self) -> tuple[str, ...]:
        """The quantisations this format has, the float one first."""
        return (FLOAT, *self.quantizers)

    @property
    def runtime_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.runtimes)

    def quantizer(self, quantization: str) -> Quantizer:
        """The quantiser for ``quantization``; :class:`ExportError` when the format has none
        (or the quantisation is not one at all)."""
        if quantization not in QUANTIZATIONS:
            raise ExportError(
                f"unknown quantization {quantization}; choose from {', '.join(QUANTIZATIONS)}"
            )
        if quantization not in self.quantizers:
            raise ExportError(
                f"format {self.name} has no {quantization} quantisation; "
                f"it has {', '.join(self.quantizations)}"
            )
        return self.quantizers[quantization]

    def check_quantizations(self, quantizations: Sequence[str]) -> None:
        """Raise :class:`ExportError` unless this format has every one of ``quantizations``."""
        for q in quantizations:
            if q != FLOAT:
                self.quantizer(q)

    def filename(self, prototype: str, round_: int, quantization: str) -> str:
        """File name of one artifact, e.g. ``M-round-10-int8.tflite``, ``S-round-4-train.pte``."""
        return f"{prototype}-round-{round_}{self._tag(quantization)}{self.suffix}"

    def artifact_glob(self, quantization: str) -> str:
        """Glob pattern of this format's artifacts of ``quantization``, e.g. ``*-int8.tflite``."""
        return f"*{self._tag(quantization)}{self.suffix}"

    def _tag(self, quantization: str) -> str:
        return f"-{QUANT_TAGS[quantization]}" if self.quantization_in_name else ""


def verify_on_runtimes(built: Built, job: VerifyJob) -> list[VerifyRow]:
    """The verifier of inference artifacts: parity, accuracy and latency on every runtime
    of the format (see :func:`export.verify.verify_on_runtimes`)."""
    from export.verify import verify_on_runtimes as verify

    return verify(built, job)
