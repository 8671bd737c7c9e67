"""PyTorch -> TFLite (LiteRT) with litert-torch.

The graph has a fixed batch of 1: litert-torch 0.10 cannot lower the
reshapes of these models with a symbolic batch dimension (it fails for every
family of the zoo), and batch 1 is what on-device inference runs anyway. The
runner in :mod:`export.runtimes` loops over larger batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.common import ExportError, quiet
from takfl.files import atomic_path

TFLITE_BATCH = 1


@dataclass(kw_only=True)
class TfliteExport:
    path: Path
    batch: int
    input_name: str  # signature names the converter gave (e.g. "args_0", "output_0")
    output_name: str
    notes: list[str] = field(default_factory=list)


def tflite_io_names(path: str | Path) -> tuple[str, str]:
    """(input, output) names of the model's single signature."""
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_path=str(path)).get_signature_list()
    if len(signatures) != 1:
        raise ExportError(f"{path}: expected one signature, found {sorted(signatures)}")
    sig = next(iter(signatures.values()))
    if len(sig["inputs"]) != 1 or len(sig["outputs"]) != 1:
        raise ExportError(f"{path}: expected one input and one output, found {sig}")
    return str(sig["inputs"][0]), str(sig["outputs"][0])


def litert_torch_importable() -> tuple[bool, str]:
    """(importable?, reason when not)."""
    try:
        import litert_torch  # noqa: F401
    except Exception as e:  # ImportError, or a broken native dependency
        return False, f"litert-torch cannot be imported ({type(e).__name__}: {e})"
    return True, ""


def tflite_io_quantization(path: str | Path) -> dict[str, dict[str, Any]]:
    """dtype, scale and zero point of the input and output tensors.

    A full-integer model takes ``q = round(x / scale) + zero_point`` as int8 and
    returns ``(q - zero_point) * scale``; float tensors have scale 0. Recorded in
    the sidecar so integer-only targets (TFLite Micro) need no interpreter to know.
    """
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    out: dict[str, dict[str, Any]] = {}
    for role, details in (
        ("input", interp.get_input_details()),
        ("output", interp.get_output_details()),
    ):
        scale, zero = details[0]["quantization"]
        out[role] = {
            "dtype": np.dtype(details[0]["dtype"]).name,
            "scale": float(scale),
            "zero_point": int(zero),
            "shape": [int(d) for d in details[0]["shape"]],
        }
    return out


def export_tflite(model: nn.Module, sample: torch.Tensor, path: str | Path) -> TfliteExport:
    """Convert ``model`` (eval mode) to a float32 ``.tflite`` at ``path``.

    Args:
        model: maps (1, C, H, W) float32 to (1, num_classes) logits.
        sample: (B, C, H, W) real inputs; the first one traces the graph.
    """
    if sample.ndim != 4 or sample.shape[0] < 1:
        raise ExportError(f"sample input must be (B, C, H, W), got {tuple(sample.shape)}")
    ok, reason = litert_torch_importable()
    if not ok:
        raise ExportError(reason)
    model.eval()
    out = Path(path)
    previous = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        import litert_torch

        with atomic_path(out) as tmp, quiet():
            edge = litert_torch.convert(model, (sample[:TFLITE_BATCH].contiguous(),))
            edge.export(str(tmp))
    finally:
        if previous is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = previous
    input_name, output_name = tflite_io_names(out)
    return TfliteExport(
        path=out, batch=TFLITE_BATCH, input_name=input_name, output_name=output_name
    )
