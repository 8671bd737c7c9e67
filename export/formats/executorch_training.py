"""The ExecuTorch training program unit: forward, cross-entropy and backward in one
program that a phone trains with (ExecuTorch's SGD, :mod:`takfl.ondevice`).

Its check is its own: the program trains one epoch of SGD on real samples through the
runtime, and every parameter must end where torch's ``train_local`` puts it (within the
parity bound), because a wrong backward kernel fails silently. A program that does not
pass is not written. It runs no inference, so it has no loader; its report row is that
check.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from export.common import ExportError
from export.formats.executorch import (
    EXECUTORCH,
    PARITY,
    PROGRAM_SUFFIX,
    input_shape,
    program_fields,
    read_embedded,
    stamp,
    write_program,
)
from export.formats.unit import BuildJob, Built, FormatUnit, VerifyJob

if TYPE_CHECKING:
    from export.verify import VerifyRow


def export_program(job: BuildJob) -> Built:
    """The training program of ``job.model`` for batches up to the prototype's batch size,
    written only once one SGD epoch on (``job.check_x``, ``job.check_y``) through the
    runtime agrees with torch.

    Raises:
        ExportError: no training settings in the job.
        ProgramExportError: the model does not lower (training-mode BatchNorm...).
        ProgramParityError: the program trains differently from torch; ExecuTorchMissing.
    """
    if job.training is None:
        raise ExportError(
            "an ExecuTorch training program needs the prototype's training settings; "
            "export it from a checkpoint with its federation config"
        )
    from export.executorch_export import (
        TRAINING_PARITY_TOLERANCE,
        ProgramParityError,
        training_parity,
        training_program,
    )

    spec = job.training
    check = spec.model_copy(update={"optimizer": "sgd", "epochs": 1, "time_budget_s": None})
    program = training_program(job.model, input_shape(job.meta), spec.batch_size)
    parity = training_parity(job.model, program, job.check_x, job.check_y, check)
    bound = parity.bound(TRAINING_PARITY_TOLERANCE)
    if not parity.agrees(TRAINING_PARITY_TOLERANCE):
        raise ProgramParityError(
            f"training program ends {parity.max_param_diff:.2e} from torch after "
            f"{parity.steps} steps (bound {bound:.1e})"
        )
    write_program(job.path, program)
    return Built(
        path=job.path,
        batch=None,
        sidecar={
            **program_fields(job.model, spec.batch_size),
            "inputs": ["x (B, C, H, W) float32, normalised", "y (B,) int64"],
            "outputs": ["mean cross-entropy loss"],
            "optimizer": "sgd (runtime)",
            PARITY: {
                "steps": parity.steps,
                "max_param_diff": parity.max_param_diff,
                "torch_fp32_vs_fp64": parity.float_noise,
                "bound": bound,
                "learning_rate": check.learning_rate,
                "batch_size": check.batch_size,
            },
        },
        check=(
            f"{parity.steps} SGD steps on real samples: "
            f"max parameter difference {parity.max_param_diff:.1e}"
        ),
    )


def verify(built: Built, job: VerifyJob) -> list[VerifyRow]:
    """One row: the training check the program passed when it was built."""
    from export.verify import OK, VerifyRow

    return [
        VerifyRow(
            prototype=job.prototype,
            format=job.unit.name,
            quantization=job.quantization,
            runtime=EXECUTORCH.name,
            status=OK,
            reason=built.check,
            artifact=str(built.path),
            size_mb=Path(built.path).stat().st_size / 1e6,
            max_abs_diff=built.sidecar[PARITY]["max_param_diff"],
        )
    ]


UNIT = FormatUnit(
    name="executorch-training",
    title="training program",
    suffix=f"-train{PROGRAM_SUFFIX}",
    quantization_in_name=False,
    export=export_program,
    quantizers={},
    runtimes=(EXECUTORCH,),
    load=None,
    stamp=stamp,
    read_embedded=read_embedded,
    verify=verify,
    needs_training=True,
)
