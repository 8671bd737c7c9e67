"""The ExecuTorch inference program unit: the model in eval mode lowered to XNNPACK,
checked against PyTorch before it is written, run by the ExecuTorch runtime.

An ExecuTorch program carries no metadata of its own: the sidecar is all there is.
What both program units share (the runtime, the sidecar's program fields) lives here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.formats.unit import BuildJob, Built, FormatUnit, RuntimeSpec, verify_on_runtimes
from takfl.files import atomic_write_bytes

if TYPE_CHECKING:
    from torch import nn

    from export.metadata import ArtifactMetadata
    from export.runtimes import Runner
    from takfl.checkpoint import CheckpointMeta

PROGRAM_SUFFIX = ".pte"
PARITY = "parity"  # the sidecar field that records a program's check
EXECUTORCH = RuntimeSpec(
    name="executorch",
    module="executorch.runtime",
    install="pip install 'takfl-edge[executorch]' (or pip install -c constraints.txt executorch)",
)


def input_shape(meta: CheckpointMeta) -> tuple[int, int, int]:
    """(C, H, W) of one sample of the checkpoint's model."""
    return int(meta.input_shape[0]), int(meta.input_shape[1]), int(meta.input_shape[2])


def program_fields(model: nn.Module, max_batch: int) -> dict[str, Any]:
    """Sidecar fields of every program: trainable parameters by state-dict name with their
    shapes (the program's names are ``model.`` + these), its method, its largest batch."""
    from takfl.ondevice import METHOD

    return {
        "parameters": {n: list(p.shape) for n, p in model.named_parameters()},
        "method": METHOD,
        "max_batch": max_batch,
    }


def write_program(path: Path, program: bytes) -> None:
    atomic_write_bytes(path, program)


def export_program(job: BuildJob) -> Built:
    """The XNNPACK inference program of ``job.model``, written only once its logits on
    ``job.check_x`` are within ``INFERENCE_PARITY_TOLERANCE`` of torch's.

    Raises:
        ProgramParityError: the program's logits differ more; ExecuTorchMissing.
    """
    from export.executorch_export import (
        INFERENCE_MAX_BATCH,
        INFERENCE_PARITY_TOLERANCE,
        ProgramParityError,
        inference_parity,
        inference_program,
    )

    program = inference_program(job.model, input_shape(job.meta))
    diff = inference_parity(job.model, program, job.check_x[:INFERENCE_MAX_BATCH])
    if not diff <= INFERENCE_PARITY_TOLERANCE:
        raise ProgramParityError(
            f"inference program differs from torch by {diff:.2e} "
            f"(tolerance {INFERENCE_PARITY_TOLERANCE:.0e})"
        )
    write_program(job.path, program)
    return Built(
        path=job.path,
        batch=None,
        sidecar={
            **program_fields(job.model, INFERENCE_MAX_BATCH),
            "delegate": "xnnpack",
            PARITY: {"max_abs_logit_diff": diff},
        },
        check=f"max logit difference {diff:.1e}",
    )


def stamp(built: Built, meta: ArtifactMetadata) -> dict[str, Any]:
    """Nothing embedded: the sidecar's fields are the program's own."""
    return dict(built.sidecar)


def read_embedded(path: Path) -> ArtifactMetadata | None:
    """A program embeds no metadata."""
    return None


def load(
    path: Path,
    *,
    runtime: str,
    threads: int,
    metadata: ArtifactMetadata | None,
    providers: Any = None,
) -> Runner:
    """The program's ``forward`` method in the ExecuTorch runtime."""
    from export.runtimes import ProgramRunner

    return ProgramRunner(path, threads, metadata)


UNIT = FormatUnit(
    name="executorch",
    title="inference program",
    suffix=f"-xnnpack{PROGRAM_SUFFIX}",
    quantization_in_name=False,
    export=export_program,
    quantizers={},
    runtimes=(EXECUTORCH,),
    load=load,
    stamp=stamp,
    read_embedded=read_embedded,
    verify=verify_on_runtimes,
)
