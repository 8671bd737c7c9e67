"""PyTorch -> ONNX with the ``torch.onnx`` dynamo exporter, optionally slimmed by onnxslim.

The graph takes ``input`` (B, C, H, W) float32 and returns ``logits``
(B, num_classes). The batch dimension is symbolic when the exporter manages it
(every model of the zoo does); otherwise the graph is fixed to batch 1 and
:class:`OnnxExport` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.common import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, ExportError, quiet
from takfl.files import atomic_path

# Node-level metadata the exporter records (stack traces with local paths, FX
# node text): useful while debugging an export, dead weight and a leak on a device.
_DEBUG_PREFIXES = ("pkg.torch.", "namespace")

# Batch sizes bounded so shape checks in the exported program stay simple.
_MAX_BATCH = 65536


@dataclass(kw_only=True)
class OnnxExport:
    path: Path
    batch: int | None  # None: symbolic batch dimension
    opset: int
    slimmed: bool
    notes: list[str] = field(default_factory=list)


def _batch_of(sample: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` samples taken (and repeated if needed) from ``sample`` (B, C, H, W)."""
    if sample.ndim != 4 or sample.shape[0] < 1:
        raise ExportError(
            f"sample input must be (B, C, H, W) with B >= 1, got {tuple(sample.shape)}"
        )
    reps = -(-n // sample.shape[0])
    return sample.repeat(reps, 1, 1, 1)[:n].contiguous()


def _torch_export(model: nn.Module, sample: torch.Tensor, dynamic: bool, opset: int) -> Any:
    kwargs: dict[str, Any] = {}
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
        kwargs["dynamic_shapes"] = ({0: batch},)
    with quiet():
        return torch.onnx.export(
            model,
            (sample,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            verbose=False,
            **kwargs,
        )


def strip_debug_info(proto: Any) -> None:
    """Remove exporter debug metadata and doc strings from every node, in place."""
    graphs = [proto.graph] + [f for f in proto.functions]
    for g in graphs:
        for node in g.node:
            node.doc_string = ""
            keep = [p for p in node.metadata_props if not p.key.startswith(_DEBUG_PREFIXES)]
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
    proto.graph.doc_string = ""
    del proto.graph.metadata_props[:]


def _input_batch(proto: Any) -> int | None:
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    return int(dim.dim_value) if dim.HasField("dim_value") else None


def save_onnx(proto: Any, path: Path) -> None:
    """Atomically write a self-contained model (no external data; < 2 GB)."""
    import onnx

    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)


def export_onnx(
    model: nn.Module,
    sample: torch.Tensor,
    path: str | Path,
    *,
    opset: int = ONNX_OPSET,
    dynamic_batch: bool = True,
    slim: bool = True,
) -> OnnxExport:
    """Export ``model`` (eval mode) to ``path``.

    Args:
        model: maps (B, C, H, W) float32 to (B, num_classes) logits.
        sample: (B, C, H, W) real inputs used for tracing.
        opset: ONNX opset of the default domain.
        dynamic_batch: try a symbolic batch dimension first, fall back to batch 1.
        slim: run onnxslim when it is installed (constant folding, fusion).
    Returns:
        where it went, its batch size (None = dynamic) and what was done.
    """
    import onnx

    model.eval()
    out = Path(path)
    notes: list[str] = []
    program = None
    batch: int | None = None
    if dynamic_batch:
        try:
            program = _torch_export(model, _batch_of(sample, 2), True, opset)
        except Exception as e:  # the exporter raises many types; report and fall back
            notes.append(f"dynamic batch failed ({type(e).__name__}: {e}); fixed batch 1")
    if program is None:
        program = _torch_export(model, _batch_of(sample, 1), False, opset)
        batch = 1
    proto = program.model_proto
    strip_debug_info(proto)
    slimmed = False
    if slim:
        proto, slimmed, note = _slim(proto)
        if note:
            notes.append(note)
    onnx.checker.check_model(proto)
    if _input_batch(proto) != batch:
        raise ExportError(f"exported graph has batch {_input_batch(proto)}, expected {batch}")
    save_onnx(proto, out)
    return OnnxExport(path=out, batch=batch, opset=opset, slimmed=slimmed, notes=notes)


def _slim(proto: Any) -> tuple[Any, bool, str]:
    """(model, slimmed?, note). onnxslim is optional: absence or failure keeps the input."""
    try:
        import onnxslim
    except ImportError:
        return proto, False, "onnxslim not installed; graph not slimmed"
    try:
        with quiet():
            slimmed = onnxslim.slim(proto)
    except Exception as e:  # a slimming failure must not lose a valid export
        return proto, False, f"onnxslim failed ({type(e).__name__}: {e}); graph not slimmed"
    if slimmed is None:
        return proto, False, "onnxslim returned nothing; graph not slimmed"
    return slimmed, True, ""
