"""The ONNX unit: torch.onnx (dynamo) export, ONNX Runtime int8 quantisation, metadata in
the model's ``metadata_props``, run by ONNX Runtime."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.common import ONNX_OPSET, ArtifactError
from export.formats.unit import (
    BuildJob,
    Built,
    FormatUnit,
    RuntimeSpec,
    verify_on_runtimes,
)
from takfl.files import atomic_write_bytes

if TYPE_CHECKING:
    import torch

    from export.metadata import ArtifactMetadata
    from export.runtimes import Runner

ONNXRUNTIME = RuntimeSpec(
    name="onnxruntime",
    module="onnxruntime",
    install="pip install onnxruntime (use the constraints file)",
)


def export_float(job: BuildJob) -> Built:
    """The float model (eval mode) exported with ``torch.onnx``, slimmed when asked."""
    from export.onnx_export import export_onnx

    res = export_onnx(
        job.model,
        job.sample,
        job.path,
        opset=ONNX_OPSET,
        dynamic_batch=job.dynamic_batch,
        slim=job.slim,
    )
    return Built(path=res.path, batch=res.batch, opset=res.opset, notes=res.notes)


def quantize_int8(base: Built, path: Path, calibration: torch.Tensor, threads: int) -> Built:
    """Static QDQ int8, calibrated on ``calibration`` (N, C, H, W)."""
    from export.quantize import quantize_onnx_static

    res = quantize_onnx_static(base.path, path, calibration.numpy(), batch=base.batch)
    return base.variant(res.path, res.notes)


def quantize_dynamic(base: Built, path: Path, calibration: torch.Tensor, threads: int) -> Built:
    """Dynamic-range int8 weights; no calibration."""
    from export.quantize import quantize_onnx_dynamic

    res = quantize_onnx_dynamic(base.path, path)
    return base.variant(res.path, res.notes)


def stamp(built: Built, meta: ArtifactMetadata) -> dict[str, Any]:
    """Embed ``meta`` as model-level ``metadata_props``; the sidecar fields that says so."""
    set_onnx_metadata(built.path, meta.to_strings())
    return {"embedded_metadata": True, "notes": built.notes}


def read_embedded(path: Path) -> ArtifactMetadata | None:
    """The metadata in the model's ``metadata_props``; None when there is none."""
    from export.metadata import ArtifactMetadata

    props = read_onnx_metadata(path)
    return ArtifactMetadata.from_strings(props, str(path)) if "builder" in props else None


def load(
    path: Path,
    *,
    runtime: str,
    threads: int,
    metadata: ArtifactMetadata | None,
    providers: Any = None,
) -> Runner:
    """An ONNX Runtime session (CPU unless ``providers`` say otherwise)."""
    from export.runtimes import OnnxRunner

    return OnnxRunner(path, threads, metadata, providers)


def set_onnx_metadata(path: str | Path, props: dict[str, str]) -> None:
    """Set ``props`` as model-level ``metadata_props`` of the file (replacing equal keys)."""
    import onnx

    p = Path(path)
    proto = onnx.load(str(p))
    keep = [e for e in proto.metadata_props if e.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write_bytes(p, proto.SerializeToString())


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """Model-level ``metadata_props`` via onnx, else via onnxruntime; {} if neither imports."""
    p = str(path)
    if importlib.util.find_spec("onnx") is not None:
        import onnx

        try:
            proto = onnx.load(p, load_external_data=False)
        except Exception as e:  # protobuf decode errors have no common base class
            raise ArtifactError(f"{p} is not a readable ONNX model ({e})") from e
        return {e.key: e.value for e in proto.metadata_props}
    if importlib.util.find_spec("onnxruntime") is None:
        return {}
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(p, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ArtifactError(f"{p} is not a readable ONNX model ({e})") from e
    return dict(session.get_modelmeta().custom_metadata_map)


UNIT = FormatUnit(
    name="onnx",
    title="ONNX model",
    suffix=".onnx",
    quantization_in_name=True,
    export=export_float,
    quantizers={"int8": quantize_int8, "dynamic": quantize_dynamic},
    runtimes=(ONNXRUNTIME,),
    load=load,
    stamp=stamp,
    read_embedded=read_embedded,
    verify=verify_on_runtimes,
)
