"""The TFLite (LiteRT) unit: litert-torch conversion, ai-edge-quantizer int8, metadata in
a named entry of the flatbuffer's metadata table, run by ai-edge-litert or tflite-runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.common import TFLITE_METADATA_NAME, ArtifactError
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

AI_EDGE_LITERT = RuntimeSpec(
    name="ai-edge-litert",
    module="ai_edge_litert.interpreter",
    install="pip install ai-edge-litert (64-bit OS; see firmware_notes/)",
)
TFLITE_RUNTIME = RuntimeSpec(
    name="tflite-runtime",
    module="tflite_runtime.interpreter",
    install="pip install tflite-runtime (needs numpy < 2; prefer ai-edge-litert)",
)
NOT_EMBEDDED = "metadata not embedded (sidecar only)"


def export_float(job: BuildJob) -> Built:
    """The float model (eval mode) converted with litert-torch at batch 1."""
    from export.tflite_export import export_tflite

    res = export_tflite(job.model, job.sample, job.path)
    return Built(
        path=res.path,
        batch=res.batch,
        input_name=res.input_name,
        output_name=res.output_name,
        notes=res.notes,
    )


def quantize_int8(base: Built, path: Path, calibration: torch.Tensor, threads: int) -> Built:
    """Full-integer int8 (``static_wi8_ai8``), calibrated on ``calibration`` (N, C, H, W)."""
    from export.quantize import quantize_tflite_static

    res = quantize_tflite_static(base.path, path, calibration.numpy(), threads=threads)
    return base.variant(res.path, res.notes)


def quantize_dynamic(base: Built, path: Path, calibration: torch.Tensor, threads: int) -> Built:
    """Dynamic-range int8 weights (``dynamic_wi8_afp32``); no calibration."""
    from export.quantize import quantize_tflite_dynamic

    res = quantize_tflite_dynamic(base.path, path)
    return base.variant(res.path, res.notes)


def stamp(built: Built, meta: ArtifactMetadata) -> dict[str, Any]:
    """Embed ``meta`` where the file allows (a note when not); the sidecar fields: whether
    it is embedded, the notes, and the input/output tensors' integer quantisation."""
    from export.tflite_export import tflite_io_quantization

    embedded = embed_tflite_metadata(built.path, json.dumps(meta.to_dict()).encode())
    if not embedded:
        built.notes.append(NOT_EMBEDDED)
    return {
        "embedded_metadata": embedded,
        "notes": built.notes,
        "io_quantization": tflite_io_quantization(built.path),
    }


def read_embedded(path: Path) -> ArtifactMetadata | None:
    """The metadata in the ``takfl`` metadata entry; None when absent or not readable here."""
    from export.metadata import ArtifactMetadata

    payload = read_tflite_metadata(path)
    if payload is None:
        return None
    try:
        return ArtifactMetadata.from_dict(json.loads(payload), str(path))
    except ValueError as e:
        raise ArtifactError(f"{path}: embedded metadata is not valid JSON ({e})") from e


def load(
    path: Path,
    *,
    runtime: str,
    threads: int,
    metadata: ArtifactMetadata | None,
    providers: Any = None,
) -> Runner:
    """A LiteRT interpreter of ``runtime`` (ai-edge-litert or tflite-runtime)."""
    from export.runtimes import TfliteRunner

    return TfliteRunner(path, threads, metadata, runtime)


def embed_tflite_metadata(
    path: str | Path, payload: bytes, name: str = TFLITE_METADATA_NAME
) -> bool:
    """Store ``payload`` in the model's metadata table under ``name``, in place.

    Uses the flatbuffer schema shipped with ai-edge-litert. Returns False (file
    untouched) when that is not installed or when the model keeps its weights
    outside the flatbuffer (models over 2 GB), where a rewrite would lose them.
    """
    try:
        import flatbuffers
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        return False
    import numpy as np

    p = Path(path)
    buf = p.read_bytes()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(buf, 0))
    if any(getattr(b, "offset", 0) > 1 for b in model.buffers or []):
        return False
    entry_buffer = schema.BufferT()
    entry_buffer.data = np.frombuffer(payload, dtype=np.uint8)
    model.buffers.append(entry_buffer)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    old = [m for m in (model.metadata or []) if _text(m.name) != name]
    model.metadata = [*old, entry]
    builder = flatbuffers.Builder(len(buf) + len(payload) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    atomic_write_bytes(p, bytes(builder.Output()))
    return True


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_tflite_metadata(path: str | Path, name: str = TFLITE_METADATA_NAME) -> bytes | None:
    """The payload stored under ``name``; None when absent or the schema is not installed."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        return None
    p = Path(path)
    buf = p.read_bytes()
    try:
        model = schema.Model.GetRootAsModel(buf, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry is not None and _text(entry.Name()) == name:
                data = model.Buffers(entry.Buffer())
                return bytes(data.DataAsNumpy()) if data is not None else None
    except Exception as e:  # flatbuffers raises struct/index errors on garbage
        raise ArtifactError(f"{p} is not a readable TFLite model ({e})") from e
    return None


UNIT = FormatUnit(
    name="tflite",
    title="TFLite model",
    suffix=".tflite",
    quantization_in_name=True,
    export=export_float,
    quantizers={"int8": quantize_int8, "dynamic": quantize_dynamic},
    runtimes=(AI_EDGE_LITERT, TFLITE_RUNTIME),
    load=load,
    stamp=stamp,
    read_embedded=read_embedded,
    verify=verify_on_runtimes,
)
