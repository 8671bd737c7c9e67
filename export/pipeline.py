"""Checkpoint -> verified artifacts: the steps behind ``takfl-export`` and ``export_run``.

For each requested format: the float model is exported first (every quantised
variant is made from it, and it is the reference artifact), then each
quantisation. Each artifact gets its metadata (embedded and sidecar) and is
verified on every runtime for its format. A failure of one artifact becomes a
FAILED row; the others still go ahead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.common import (
    FORMAT_RUNTIMES,
    FORMATS,
    INPUT_NAME,
    ONNX_OPSET,
    OUTPUT_NAME,
    QUANTIZATIONS,
    REPORT_FILE,
    ExportError,
    artifact_filename,
    parse_choices,
)
from export.data import DEFAULT_CALIBRATION_SAMPLES, EvalData, eval_data
from export.metadata import (
    ArtifactMetadata,
    embed_tflite_metadata,
    set_onnx_metadata,
    write_sidecar,
)
from export.report import ExportReport, write_json
from export.runtimes import load_artifact, runtime_status
from export.verify import (
    FAILED,
    FP32_PARITY_TOLERANCE,
    OK,
    SKIPPED,
    Reference,
    TorchRunner,
    VerifyRow,
    reference_for,
    verify_runner,
)
from takfl.checkpoint import CheckpointError, CheckpointMeta, check_state_matches, load_checkpoint
from takfl.config import DeviceProfile, FederationConfig, load_federation, load_profile
from takfl.models import build_model


@dataclass
class ExportOptions:
    """What to export and how to measure it."""

    formats: Sequence[str] = FORMATS
    quantizations: Sequence[str] = ("none",)  # the float model is always exported too
    threads: int | None = None  # None: the prototype's profile (inference.threads)
    latency_iters: int = 100  # timed single-sample runs per runtime
    slim: bool = True  # onnxslim when installed
    dynamic_batch: bool = True  # ONNX: symbolic batch dimension when the exporter manages it
    parity_tolerance: float = FP32_PARITY_TOLERANCE  # float artifacts beyond it: MISMATCH
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES
    test_samples: int | None = None  # None: the whole test set

    def __post_init__(self) -> None:
        self.formats = parse_choices(self.formats, FORMATS, "format")
        self.quantizations = parse_choices(self.quantizations, QUANTIZATIONS, "quantization")
        if self.threads is not None and self.threads < 1:
            raise ExportError(f"threads must be at least 1, got {self.threads}")
        if self.latency_iters < 1:
            raise ExportError(f"latency_iters must be at least 1, got {self.latency_iters}")


@dataclass
class Built:
    """An artifact on disk and what its graph looks like."""

    path: Path
    batch: int | None
    opset: int | None
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    notes: list[str] = field(default_factory=list)


def usable_threads(requested: int) -> tuple[int, str]:
    """(threads to use, note): the request, capped at the cores this machine has."""
    cores = os.cpu_count() or 1
    if requested <= cores:
        return requested, ""
    return cores, f"profile asks for {requested} threads; this machine has {cores}, used {cores}"


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _build_float(
    fmt: str, model: nn.Module, sample: torch.Tensor, path: Path, options: ExportOptions
) -> Built:
    if fmt == "onnx":
        from export.onnx_export import export_onnx

        res = export_onnx(
            model,
            sample,
            path,
            opset=ONNX_OPSET,
            dynamic_batch=options.dynamic_batch,
            slim=options.slim,
        )
        return Built(res.path, res.batch, res.opset, notes=res.notes)
    from export.tflite_export import export_tflite

    tfl = export_tflite(model, sample, path)
    return Built(tfl.path, tfl.batch, None, tfl.input_name, tfl.output_name, tfl.notes)


def _build_quantized(
    fmt: str, quantization: str, base: Built, path: Path, calibration: torch.Tensor, threads: int
) -> Built:
    from export import quantize as q

    calib = calibration.numpy()
    if fmt == "onnx" and quantization == "int8":
        res = q.quantize_onnx_static(base.path, path, calib, batch=base.batch)
    elif fmt == "onnx":
        res = q.quantize_onnx_dynamic(base.path, path)
    elif quantization == "int8":
        res = q.quantize_tflite_static(base.path, path, calib, threads=threads)
    else:
        res = q.quantize_tflite_dynamic(base.path, path)
    return Built(res.path, base.batch, base.opset, base.input_name, base.output_name, res.notes)


def _stamp(built: Built, fmt: str, quantization: str, meta: CheckpointMeta) -> None:
    """Embed the metadata where the format allows, then write the sidecar (digest last)."""
    art = ArtifactMetadata.from_checkpoint(
        meta,
        fmt,
        quantization,
        batch=built.batch,
        opset=built.opset,
        input_name=built.input_name,
        output_name=built.output_name,
    )
    extra: dict[str, Any] = {}
    if fmt == "onnx":
        set_onnx_metadata(built.path, art.to_strings())
        embedded = True
    else:
        from export.tflite_export import tflite_io_quantization

        embedded = embed_tflite_metadata(built.path, json.dumps(art.to_dict()).encode())
        if not embedded:
            built.notes.append("metadata not embedded (sidecar only)")
        extra["io_quantization"] = tflite_io_quantization(built.path)
    write_sidecar(built.path, art, embedded_metadata=embedded, notes=built.notes, **extra)


def _verify_artifact(
    built: Built,
    fmt: str,
    quantization: str,
    prototype: str,
    ref: Reference,
    threads: int,
    options: ExportOptions,
) -> list[VerifyRow]:
    rows = []
    size_mb = built.path.stat().st_size / 1e6
    tolerance = options.parity_tolerance if quantization == "none" else None
    for runtime in FORMAT_RUNTIMES[fmt]:
        row = VerifyRow(
            prototype,
            fmt,
            quantization,
            runtime,
            SKIPPED,
            artifact=str(built.path),
            size_mb=size_mb,
            threads=threads,
        )
        usable, why = runtime_status(runtime)
        if not usable:
            row.reason = why.split(";")[0]
        else:
            try:
                runner = load_artifact(built.path, runtime=runtime, threads=threads)
            except Exception as e:  # a runtime refusing an artifact is a result
                row.status, row.reason = FAILED, _reason(e)
            else:
                verify_runner(
                    runner,
                    ref,
                    row,
                    latency_iters=options.latency_iters,
                    parity_tolerance=tolerance,
                )
        if built.notes and row.status != FAILED and not row.reason:
            row.reason = "; ".join(built.notes)[:300]
        rows.append(row)
    return rows


def _ordered_quantizations(requested: Sequence[str]) -> list[str]:
    return ["none", *[q for q in requested if q != "none"]]


def export_model(
    model: nn.Module,
    meta: CheckpointMeta,
    data: EvalData,
    out_dir: str | Path,
    options: ExportOptions | None = None,
    *,
    threads: int = 1,
    checkpoint: str | None = None,
) -> ExportReport:
    """Export ``model`` in every requested format and quantisation, verify, write report.json.

    Args:
        model: the trained model (eval mode), mapping (B, *meta.input_shape) to logits.
        meta: identity and preprocessing recorded in every artifact.
        data: calibration and test inputs (see :func:`export.data.eval_data`).
        threads: CPU threads of every runtime (and of PyTorch) during measurements.
    Returns:
        the report; also written to ``out_dir/report.json``.
    """
    opts = options or ExportOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    report = ExportReport(
        meta.prototype,
        int(meta.round),
        meta.builder,
        str(out),
        threads,
        data.description,
        checkpoint,
    )
    ref = reference_for(model, data.test_x, data.test_y)
    torch_row = VerifyRow(meta.prototype, "torch", "none", "torch", OK, threads=threads)
    report.rows.append(
        verify_runner(TorchRunner(model, threads), ref, torch_row, latency_iters=opts.latency_iters)
    )
    sample = data.calibration[:2]
    for fmt in opts.formats:
        base: Built | None = None
        for quant in _ordered_quantizations(opts.quantizations):
            path = out / artifact_filename(meta.prototype, int(meta.round), fmt, quant)
            try:
                if quant == "none":
                    built = base = _build_float(fmt, model, sample, path, opts)
                elif base is None:
                    raise ExportError("the float export failed, nothing to quantise")
                else:
                    built = _build_quantized(fmt, quant, base, path, data.calibration, threads)
                _stamp(built, fmt, quant, meta)
            except Exception as e:  # one failed artifact is a FAILED row, not a failed run
                report.rows.append(
                    VerifyRow(
                        meta.prototype, fmt, quant, "-", FAILED, reason=_reason(e), threads=threads
                    )
                )
                continue
            report.rows.extend(
                _verify_artifact(built, fmt, quant, meta.prototype, ref, threads, opts)
            )
    write_json(out / REPORT_FILE, report.to_dict())
    return report


# ---- from a checkpoint and a federation config ------------------------------------------


def _load_config(config: str | Path | FederationConfig) -> tuple[FederationConfig, Path | None]:
    if isinstance(config, FederationConfig):
        return config, None
    return load_federation(config), Path(config) if Path(config).is_file() else None


def prototype_profile(cfg: FederationConfig, name: str, cfg_path: Path | None) -> DeviceProfile:
    """The device profile of prototype ``name`` (paths relative to the config file)."""
    ref = cfg.prototype(name).profile
    if cfg_path is not None and not Path(ref).is_absolute() and (cfg_path.parent / ref).is_file():
        ref = str(cfg_path.parent / ref)
    return load_profile(ref)


def check_against_config(
    state: dict[str, torch.Tensor],
    meta: CheckpointMeta,
    cfg: FederationConfig,
    prototype: str,
    profile: DeviceProfile,
    source: str,
) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint is the model the config gives
    ``prototype`` (builder, arguments and every tensor's name and shape)."""
    spec = cfg.prototype(prototype).model or profile.model
    if meta.prototype != prototype:
        raise CheckpointError(
            f"{source} is a checkpoint of prototype {meta.prototype!r}, not {prototype!r}"
        )
    if meta.builder != spec.builder or json.dumps(meta.builder_args, sort_keys=True) != json.dumps(
        spec.args, sort_keys=True
    ):
        raise CheckpointError(
            f"{source} holds {meta.builder}({meta.builder_args}) but the config gives "
            f"prototype {prototype!r} {spec.builder}({spec.args}); pass the matching config"
        )
    expected = build_model(spec.builder, meta.num_classes, meta.input_shape, **spec.args)
    check_state_matches(expected.state_dict(), state, source)


def export_checkpoint(
    checkpoint: str | Path,
    config: str | Path | FederationConfig,
    out_dir: str | Path | None = None,
    *,
    prototype: str | None = None,
    options: ExportOptions | None = None,
    data: EvalData | None = None,
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
    cfg, cfg_path = _load_config(config)
    state, meta = load_checkpoint(checkpoint)
    name = prototype or meta.prototype
    known = [p.name for p in cfg.prototypes]
    if name not in known:
        raise ExportError(
            f"unknown prototype {name!r}; federation {cfg.name!r} has {', '.join(known)}"
        )
    profile = prototype_profile(cfg, name, cfg_path)
    check_against_config(state, meta, cfg, name, profile, str(checkpoint))
    data = data or eval_data(
        cfg, calibration_samples=opts.calibration_samples, test_samples=opts.test_samples
    )
    if data.input_shape != tuple(meta.input_shape) or data.num_classes != meta.num_classes:
        raise ExportError(
            f"{checkpoint} takes {tuple(meta.input_shape)} with {meta.num_classes} classes; "
            f"the data set gives {data.input_shape} with {data.num_classes}"
        )
    model = meta.build()
    model.load_state_dict(state)
    threads, note = usable_threads(opts.threads or profile.inference.threads)
    out = Path(out_dir) if out_dir is not None else Path("exports") / name
    report = export_model(
        model.eval(), meta, data, out, opts, threads=threads, checkpoint=str(checkpoint)
    )
    if note:
        report.notes.append(note)
        write_json(out / REPORT_FILE, report.to_dict())
    return report
