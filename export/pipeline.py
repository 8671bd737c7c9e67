"""Checkpoint -> verified artifacts: the steps behind ``takfl-export`` and ``export_run``.

The formats are units of :mod:`export.formats`, resolved once in :class:`ExportOptions`.
For each: the float model is exported first (every quantised variant is made from it,
and it is the reference artifact), then each quantisation. Each artifact is stamped
(metadata embedded where its format allows, a sidecar always) and verified by its
unit. A failure of one artifact becomes a FAILED row; the others still go ahead.

The ExecuTorch programs for phones (``takfl-export --executorch``) go through the same
units with :func:`export_programs`: both are built, each checked by its unit as it is
built, before either is stamped, and a failure stops the export.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from export.common import QUANTIZATIONS, REPORT_FILE, TORCH_RUNTIME, ExportError, parse_choices
from export.data import DEFAULT_CALIBRATION_SAMPLES, ExportData, eval_data
from export.formats import (
    DEFAULT_FORMATS,
    FLOAT,
    BuildJob,
    Built,
    FormatUnit,
    VerifyJob,
    resolve_formats,
)
from export.metadata import stamp_artifact
from export.report import ExportReport, write_json
from export.source import checked_checkpoint
from export.verify import (
    FAILED,
    FP32_PARITY_TOLERANCE,
    OK,
    Reference,
    TorchRunner,
    VerifyRow,
    failure_reason,
    reference_for,
    verify_runner,
)
from takfl.checkpoint import CheckpointMeta
from takfl.config import FederationConfig
from takfl.config.loader import prototype_training
from takfl.config.profile import TrainingSpec

PARITY_SAMPLES = 64  # real test samples of the checks made while building (programs)
PROGRAM_FORMATS = ("executorch-training", "executorch")  # what --executorch exports


@dataclass(kw_only=True)
class ExportOptions:
    """What to export and how to measure it."""

    formats: Sequence[str | FormatUnit] = DEFAULT_FORMATS
    quantizations: Sequence[str] = (FLOAT,)  # the float model is always exported too
    threads: int | None = None  # None: the prototype's profile (inference.threads)
    latency_iters: int = 100  # timed single-sample runs per runtime
    slim: bool = True  # onnxslim when installed
    dynamic_batch: bool = True  # ONNX: symbolic batch dimension when the exporter manages it
    parity_tolerance: float = FP32_PARITY_TOLERANCE  # float artifacts beyond it: MISMATCH
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES
    test_samples: int | None = None  # None: the whole test set
    units: tuple[FormatUnit, ...] = field(init=False)  # ``formats`` resolved, in order

    def __post_init__(self) -> None:
        self.units = resolve_formats(self.formats)
        self.formats = [u.name for u in self.units]
        self.quantizations = parse_choices(self.quantizations, QUANTIZATIONS, "quantization")
        for unit in self.units:
            unit.check_quantizations(self.quantizations)
        if self.threads is not None and self.threads < 1:
            raise ExportError(f"threads must be at least 1, got {self.threads}")
        if self.latency_iters < 1:
            raise ExportError(f"latency_iters must be at least 1, got {self.latency_iters}")


def usable_threads(requested: int) -> tuple[int, str]:
    """(threads to use, note): the request, capped at the cores this machine has."""
    cores = os.cpu_count() or 1
    if requested <= cores:
        return requested, ""
    return cores, f"profile asks for {requested} threads; this machine has {cores}, used {cores}"


def _ordered_quantizations(requested: Sequence[str]) -> list[str]:
    return [FLOAT, *[q for q in requested if q != FLOAT]]


def export_format(
    unit: FormatUnit,
    job: BuildJob,
    calibration: torch.Tensor,
    ref: Reference,
    threads: int,
    options: ExportOptions,
) -> list[VerifyRow]:
    """The rows of one format: its float artifact, then each quantisation made from it.

    Args:
        job: the model and inputs; ``job.path`` is the output folder.
        calibration: (N, C, H, W) real inputs of the int8 quantisers.
        ref: what the verifier compares against.
    """
    rows: list[VerifyRow] = []
    base: Built | None = None
    prototype = job.meta.prototype
    for quant in _ordered_quantizations(options.quantizations):
        path = job.path / unit.filename(prototype, int(job.meta.round), quant)
        try:
            if quant == FLOAT:
                built = base = unit.export(replace(job, path=path))
            elif base is None:
                raise ExportError("the float export failed, nothing to quantise")
            else:
                built = unit.quantizer(quant)(base, path, calibration, threads)
            stamp_artifact(unit, built, quant, job.meta)
        except Exception as e:  # one failed artifact is a FAILED row, not a failed run
            rows.append(
                VerifyRow(
                    prototype=prototype,
                    format=unit.name,
                    quantization=quant,
                    runtime="-",
                    status=FAILED,
                    reason=failure_reason(e),
                    threads=threads,
                )
            )
            continue
        check = VerifyJob(
            unit=unit,
            quantization=quant,
            prototype=prototype,
            reference=ref,
            threads=threads,
            latency_iters=options.latency_iters,
            parity_tolerance=options.parity_tolerance if quant == FLOAT else None,
        )
        rows.extend(unit.verify(built, check))
    return rows


def export_model(
    model: nn.Module,
    meta: CheckpointMeta,
    data: ExportData,
    out_dir: str | Path,
    options: ExportOptions | None = None,
    *,
    threads: int = 1,
    checkpoint: str | None = None,
    training: TrainingSpec | None = None,
) -> ExportReport:
    """Export ``model`` in every requested format and quantisation, verify, write report.json.

    Args:
        model: the trained model (eval mode), mapping (B, *meta.input_shape) to logits.
        meta: identity and preprocessing recorded in every artifact.
        data: calibration and test inputs (see :func:`export.data.eval_data`).
        threads: CPU threads of every runtime (and of PyTorch) during measurements.
        training: the prototype's local training (only the training program needs it).
    Returns:
        the report; also written to ``out_dir/report.json``.
    """
    opts = options or ExportOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    report = ExportReport(
        prototype=meta.prototype,
        round=int(meta.round),
        builder=meta.builder,
        out_dir=str(out),
        threads=threads,
        data=data.description,
        checkpoint=checkpoint,
    )
    ref = reference_for(model, data.test_x, data.test_y)
    torch_row = VerifyRow(
        prototype=meta.prototype,
        format=TORCH_RUNTIME,
        quantization=FLOAT,
        runtime=TORCH_RUNTIME,
        status=OK,
        threads=threads,
    )
    report.rows.append(
        verify_runner(TorchRunner(model, threads), ref, torch_row, latency_iters=opts.latency_iters)
    )
    job = BuildJob(
        model=model,
        meta=meta,
        path=out,
        sample=data.calibration[:2],
        check_x=data.test_x[:PARITY_SAMPLES],
        check_y=data.test_y[:PARITY_SAMPLES],
        training=training,
        slim=opts.slim,
        dynamic_batch=opts.dynamic_batch,
    )
    for unit in opts.units:
        report.rows.extend(export_format(unit, job, data.calibration, ref, threads, opts))
    write_json(out / REPORT_FILE, report.to_dict())
    return report


# ---- from a checkpoint and a federation config (export.source) -------------------------


def _check_data(data: ExportData, meta: CheckpointMeta, checkpoint: str | Path) -> None:
    if data.input_shape != tuple(meta.input_shape) or data.num_classes != meta.num_classes:
        raise ExportError(
            f"{checkpoint} takes {tuple(meta.input_shape)} with {meta.num_classes} classes; "
            f"the data set gives {data.input_shape} with {data.num_classes}"
        )


def export_checkpoint(
    checkpoint: str | Path,
    config: str | Path | FederationConfig,
    out_dir: str | Path | None = None,
    *,
    prototype: str | None = None,
    options: ExportOptions | None = None,
    data: ExportData | None = None,
) -> ExportReport:
    """Validate a checkpoint against the federation config, then :func:`export_model` it.

    Args:
        out_dir: where the artifacts go; ``exports/<prototype>`` when None.
        prototype: the prototype the checkpoint must belong to; the checkpoint's own if None.
        data: calibration/test inputs; rebuilt from the config's data set if None.
    Raises:
        CheckpointError: unreadable checkpoint, or not the config's model for the prototype.
        ExportError: unknown prototype, format or quantisation; data not matching the model.
        ConfigError: the config does not load.
    """
    opts = options or ExportOptions()
    src = checked_checkpoint(checkpoint, config, prototype)
    data = data or eval_data(
        src.cfg, calibration_samples=opts.calibration_samples, test_samples=opts.test_samples
    )
    _check_data(data, src.meta, checkpoint)
    threads, note = usable_threads(opts.threads or src.profile.inference.threads)
    needs_training = any(u.needs_training for u in opts.units)
    out = Path(out_dir) if out_dir is not None else Path("exports") / src.prototype
    report = export_model(
        src.model,
        src.meta,
        data,
        out,
        opts,
        threads=threads,
        checkpoint=str(checkpoint),
        training=prototype_training(src.cfg, src.prototype) if needs_training else None,
    )
    if note:
        report.notes.append(note)
        write_json(out / REPORT_FILE, report.to_dict())
    return report


def export_programs(
    checkpoint: str | Path,
    config: str | Path | FederationConfig,
    out_dir: str | Path | None = None,
    *,
    prototype: str | None = None,
) -> list[tuple[FormatUnit, Built]]:
    """The ExecuTorch training and inference programs of a checkpoint, each checked by its
    unit on the first ``PARITY_SAMPLES`` test samples with the prototype's training
    settings, then stamped with its sidecar; nothing is left written when one fails.

    Returns:
        (unit, artifact) of each program, the training program first.
    Raises:
        CheckpointError, ExportError, ConfigError like :func:`export_checkpoint`;
        ProgramExportError / ProgramParityError when the model does not lower or does not
        train through ExecuTorch correctly; ExecuTorchMissing.
    """
    src = checked_checkpoint(checkpoint, config, prototype)
    data = eval_data(src.cfg, calibration_samples=8, test_samples=PARITY_SAMPLES)
    _check_data(data, src.meta, checkpoint)
    out = Path(out_dir) if out_dir is not None else Path("exports") / src.prototype
    out.mkdir(parents=True, exist_ok=True)
    job = BuildJob(
        model=src.model,
        meta=src.meta,
        path=out,
        sample=data.calibration[:2],
        check_x=data.test_x,
        check_y=data.test_y,
        training=prototype_training(src.cfg, src.prototype),
    )
    units = resolve_formats(PROGRAM_FORMATS)
    built = _build_all(units, job)
    for unit, artifact in zip(units, built, strict=True):
        stamp_artifact(unit, artifact, FLOAT, src.meta)
    return list(zip(units, built, strict=True))


def _build_all(units: Sequence[FormatUnit], job: BuildJob) -> list[Built]:
    """The float artifact of every unit into the folder ``job.path``; when one fails, those
    written before it are removed and the error propagates."""
    built: list[Built] = []
    try:
        for unit in units:
            name = unit.filename(job.meta.prototype, int(job.meta.round), FLOAT)
            built.append(unit.export(replace(job, path=job.path / name)))
    except BaseException:
        for artifact in built:
            artifact.path.unlink(missing_ok=True)
        raise
    return built
