"""Every export format x quantisation x runtime against PyTorch eager, per digits prototype.

    python benchmarks/export_bench.py [--run DIR] [--epochs 30] [--threads N]
                                      [--latency-iters 300] [--skip-zoo]

Models: each prototype's model of the digits federation (S, M, L), either
trained here with ``train_local`` on the federation's whole private pool for a
fixed number of epochs (default), or the latest checkpoints of a run
(``--run``); the output says which. Each is exported to ONNX and TFLite, float,
static int8 and dynamic-range int8, and verified on every runtime installed:
parity and top-1 agreement with PyTorch and accuracy on the federation's test
set, file size, latency per sample at batch 1 (p50/p90).

Acceptance checks: float parity <= 1e-4; int8 accuracy at most 1 point below
float; int8 file at most 0.35 of the float file; latency relative to PyTorch
eager on this machine. Then every zoo model is exported to both formats (float)
and checked for parity. Prints tables and writes benchmarks/results/export.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from export.data import ExportData, eval_data
from export.formats import DEFAULT_FORMATS, BuildJob, resolve_formats
from export.pipeline import ExportOptions, export_model, usable_threads
from export.report import ExportReport, render_table, write_json
from export.run_export import latest_checkpoint
from export.runtimes import load_artifact
from export.source import prototype_profile
from export.verify import OK
from takfl.checkpoint import CheckpointMeta, load_model
from takfl.config import FederationConfig, load_federation, prototype_model
from takfl.config.profile import TrainingSpec
from takfl.data import load_digits
from takfl.federation_data import build_federation_data
from takfl.models import build_model, count_parameters, get_entry, model_names
from takfl.run_layout import CONFIG_FILE
from takfl.training import train_local

RESULTS = Path(__file__).resolve().parent / "results" / "export.json"
PARITY_MAX = 1e-4
INT8_MAX_DROP = 1.0  # accuracy points
INT8_MAX_SIZE_RATIO = 0.35
PACKAGES = (
    "torch",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "onnxslim",
    "litert-torch",
    "ai-edge-litert",
    "ai-edge-quantizer",
)


def trained_models(
    cfg: FederationConfig, epochs: int
) -> tuple[dict[str, tuple[torch.nn.Module, CheckpointMeta]], str]:
    """Each prototype's model trained on the whole private pool (all clients together)."""
    fed = build_federation_data(cfg)
    x = torch.cat([cx for _, cx, _ in fed.clients.values()])
    y = torch.cat([cy for _, _, cy in fed.clients.values()])
    out = {}
    for i, proto in enumerate(cfg.prototypes):
        spec = prototype_model(cfg, proto.name)
        torch.manual_seed(i)
        model = build_model(spec.builder, fed.num_classes, fed.input_shape, **spec.args)
        train_local(model, x, y, TrainingSpec(epochs=epochs, batch_size=32), seed=i)
        meta = CheckpointMeta(
            prototype=proto.name,
            round=0,
            builder=spec.builder,
            num_classes=fed.num_classes,
            input_shape=fed.input_shape,
            builder_args=dict(spec.args),
            class_names=fed.pool.class_names,
            mean=fed.pool.mean,
            std=fed.pool.std,
        )
        out[proto.name] = (model.eval(), meta)
    source = (
        f"trained here: train_local (Adam, lr 1e-3, batch 32) for {epochs} epochs on "
        f"the digits private pool ({len(x)} samples, all clients together)"
    )
    return out, source


def run_models(run: Path) -> tuple[dict[str, tuple[torch.nn.Module, CheckpointMeta]], str]:
    cfg = load_federation(run / CONFIG_FILE)
    out = {}
    for proto in cfg.prototypes:
        path = latest_checkpoint(run, proto.name)
        out[proto.name] = load_model(path)
    rounds = ", ".join(f"{p}: round {m.round}" for p, (_, m) in out.items())
    return out, f"latest checkpoints of run {run} ({rounds})"


def _rows(report: ExportReport, fmt: str, quant: str) -> list[Any]:
    return [
        r for r in report.rows if r.format == fmt and r.quantization == quant and r.status == OK
    ]


def acceptance(report: ExportReport, params: int) -> list[dict[str, Any]]:
    """One entry per format: the four checks, and what they measured."""
    (torch_row,) = _rows(report, "torch", "none")
    out = []
    for fmt in DEFAULT_FORMATS:
        fp32, int8 = _rows(report, fmt, "none"), _rows(report, fmt, "int8")
        if not fp32 or not int8:
            out.append({"prototype": report.prototype, "format": fmt, "complete": False})
            continue
        parity = max(r.max_abs_diff for r in fp32)
        drop = fp32[0].accuracy - min(r.accuracy for r in int8)
        ratio = int8[0].size_mb / fp32[0].size_mb
        entry: dict[str, Any] = {
            "prototype": report.prototype,
            "format": fmt,
            "complete": True,
            "params": params,
            "fp32_parity": parity,
            "parity_ok": parity <= PARITY_MAX,
            "int8_accuracy_drop": drop,
            "accuracy_ok": drop <= INT8_MAX_DROP,
            "int8_size_ratio": ratio,
            "size_ok": ratio <= INT8_MAX_SIZE_RATIO,
            # bytes beyond one per parameter: graph, names, scales, zero points, metadata
            "int8_overhead_kb": (int8[0].size_mb * 1e6 - params) / 1e3,
            "torch_p50_ms": torch_row.p50_ms,
            "fp32_speedup_vs_torch": torch_row.p50_ms / fp32[0].p50_ms,
            "int8_speedup_vs_torch": torch_row.p50_ms / int8[0].p50_ms,
        }
        out.append(entry)
    return out


def acceptance_table(entries: list[dict[str, Any]]) -> Table:
    def mark(ok: bool) -> str:
        return "[green]yes[/green]" if ok else "[red]no[/red]"

    t = Table(title="Acceptance (int8 = static int8 vs float, same format)")
    for col in (
        "proto",
        "format",
        "params",
        "fp32 max|diff|",
        "<=1e-4",
        "int8 acc drop",
        "<=1 pt",
        "int8/fp32 size",
        "<=0.35",
        "int8 overhead KB",
        "fp32 x torch",
        "int8 x torch",
    ):
        t.add_column(col, justify="left" if col in ("proto", "format") else "right")
    for e in entries:
        if not e["complete"]:
            t.add_row(e["prototype"], e["format"], *["-"] * 10)
            continue
        t.add_row(
            e["prototype"],
            e["format"],
            f"{e['params']:,}",
            f"{e['fp32_parity']:.1e}",
            mark(e["parity_ok"]),
            f"{e['int8_accuracy_drop']:+.2f}",
            mark(e["accuracy_ok"]),
            f"{e['int8_size_ratio']:.3f}",
            mark(e["size_ok"]),
            f"{e['int8_overhead_kb']:.1f}",
            f"{e['fp32_speedup_vs_torch']:.1f}x",
            f"{e['int8_speedup_vs_torch']:.1f}x",
        )
    return t


def zoo_inputs(shape: tuple[int, int, int], n: int = 8) -> torch.Tensor:
    """Real digits images resized to ``shape`` (bilinear) and repeated over its channels."""
    x = load_digits().x[:n]
    x = F.interpolate(x, size=shape[1:], mode="bilinear", align_corners=False)
    return x.repeat(1, shape[0], 1, 1).contiguous()


def zoo_check(work: Path) -> list[dict[str, Any]]:
    """Every registered model at its default input shape, float, both formats, parity."""
    out = []
    for name in model_names():
        shape = get_entry(name).default_input_shape
        torch.manual_seed(0)
        model = build_model(name, 10, shape).eval()
        x = zoo_inputs(shape)
        with torch.inference_mode():
            ref = model(x).numpy()
        meta = CheckpointMeta(
            prototype=name, round=0, builder=name, num_classes=10, input_shape=shape
        )
        for unit in resolve_formats(DEFAULT_FORMATS):
            entry: dict[str, Any] = {
                "model": name,
                "format": unit.name,
                "input_shape": list(shape),
                "params": count_parameters(model),
            }
            path = work / f"{name}{unit.suffix}"
            job = BuildJob(
                model=model,
                meta=meta,
                path=path,
                sample=x[:2],
                check_x=x,
                check_y=torch.from_numpy(ref.argmax(1)),
            )
            start = time.perf_counter()
            try:
                entry["batch"] = unit.export(job).batch or "dynamic"
                entry["export_s"] = time.perf_counter() - start
                logits = load_artifact(path, threads=1).run(x.numpy())
                diff = float(abs(logits - ref).max())
                entry |= {
                    "status": "OK" if diff <= PARITY_MAX else "MISMATCH",
                    "max_abs_diff": diff,
                    "size_mb": path.stat().st_size / 1e6,
                }
            except Exception as e:  # record why a model does not export, keep going
                entry |= {"status": "FAILED", "reason": f"{type(e).__name__}: {e}"[:300]}
            out.append(entry)
    return out


def zoo_table(entries: list[dict[str, Any]]) -> Table:
    t = Table(title="Model zoo: float export at the default input shape, 8 digits images resized")
    for col in (
        "model",
        "params",
        "format",
        "status",
        "batch",
        "size MB",
        "max|diff|",
        "export s",
        "reason",
    ):
        t.add_column(
            col,
            justify="right" if col in ("params", "size MB", "max|diff|", "export s") else "left",
        )
    for e in entries:
        t.add_row(
            e["model"],
            f"{e['params']:,}",
            e["format"],
            e["status"],
            str(e.get("batch", "-")),
            f"{e['size_mb']:.3f}" if "size_mb" in e else "-",
            f"{e['max_abs_diff']:.1e}" if "max_abs_diff" in e else "-",
            f"{e['export_s']:.1f}" if "export_s" in e else "-",
            e.get("reason", ""),
        )
    return t


def environment() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "packages": versions,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", type=Path, help="take the models from this run's latest checkpoints")
    ap.add_argument("--epochs", type=int, default=30, help="training epochs when not --run")
    ap.add_argument(
        "--threads",
        type=int,
        help="runtime threads (default: each profile's, capped at this machine's cores)",
    )
    ap.add_argument("--latency-iters", type=int, default=300)
    ap.add_argument("--skip-zoo", action="store_true", help="skip the zoo export check")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    console = Console(width=max(Console().width, 160))

    cfg = load_federation(args.run / CONFIG_FILE if args.run else "digits")
    models, source = run_models(args.run) if args.run else trained_models(cfg, args.epochs)
    console.print(f"models: {source}")
    data: ExportData = eval_data(cfg)
    console.print(f"data: {data.description}")
    options = ExportOptions(
        formats=DEFAULT_FORMATS,
        quantizations=["none", "int8", "dynamic"],
        latency_iters=args.latency_iters,
    )
    reports, accept = [], []
    with tempfile.TemporaryDirectory(prefix="takfl-export-bench-") as work:
        for name, (model, meta) in models.items():
            profile = prototype_profile(cfg, name, None)
            threads, _ = usable_threads(args.threads or profile.inference.threads)
            report = export_model(model, meta, data, Path(work) / name, options, threads=threads)
            report.notes.append(
                f"profile {profile.name} asks for "
                f"{profile.inference.threads} threads; measured with {threads}"
            )
            reports.append(report)
            accept += acceptance(report, count_parameters(model))
        console.print(render_table(reports, "Export formats x quantisation x runtime (digits)"))
        console.print(acceptance_table(accept))
        zoo = [] if args.skip_zoo else zoo_check(Path(work))
        if zoo:
            console.print(zoo_table(zoo))
    payload: dict[str, Any] = {
        "model_source": source,
        "data": data.description,
        "environment": environment(),
        "thresholds": {
            "fp32_parity": PARITY_MAX,
            "int8_accuracy_drop": INT8_MAX_DROP,
            "int8_size_ratio": INT8_MAX_SIZE_RATIO,
        },
        "prototypes": [r.to_dict() for r in reports],
        "acceptance": accept,
        "zoo": zoo,
    }
    for rep in payload["prototypes"]:  # artifacts lived in a temporary folder
        rep.pop("out_dir"), rep.pop("artifacts")
        for row in rep["rows"]:
            row["artifact"] = Path(row["artifact"]).name if row["artifact"] else None
    write_json(args.out, payload)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
