"""Load an exported artifact and run it: ONNX Runtime, ai-edge-litert, tflite-runtime,
ExecuTorch. Which runtimes run which file is declared by the format units
(:mod:`export.formats`); the runners of each runtime are here.

This is the loader the edge agent's ``predict`` uses, so it needs only NumPy
plus whichever runtime the device has: each runtime is imported when an
artifact is loaded with it, never at module import.

    runner = load_artifact("M-round-10-int8.tflite", threads=4)
    logits = runner.run(images)            # (N, C, H, W) float32 -> (N, classes)
    labels = top1(logits, runner.metadata.class_names)

Thread counts are always set explicitly: ai-edge-litert and tflite-runtime
default to one thread, ONNX Runtime to every core.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from export.common import ArtifactError
from export.formats import FormatUnit, resolve_format, runtime_specs, unit_for_path
from export.formats.executorch import EXECUTORCH
from export.formats.onnx import ONNXRUNTIME
from export.metadata import ArtifactMetadata, read_embedded_metadata, read_metadata, sidecar_path


class RuntimeUnavailableError(ArtifactError):
    """The requested runtime is not installed or cannot be imported here."""


@functools.cache
def runtime_status(runtime: str) -> tuple[bool, str]:
    """(usable?, reason when not). Imports the runtime once and remembers the answer."""
    specs = runtime_specs()
    spec = specs.get(runtime)
    if spec is None:
        return False, f"unknown runtime {runtime!r}; known: {', '.join(specs)}"
    try:
        importlib.import_module(spec.module)
    except ModuleNotFoundError:
        return False, f"{runtime} not installed; {spec.install}"
    except Exception as e:  # an ABI mismatch (tflite-runtime built for numpy 1) and the like
        return False, f"{runtime} cannot be imported ({type(e).__name__}: {e}); {spec.install}"
    return True, ""


def available_runtimes(fmt: str | FormatUnit | None = None) -> list[str]:
    """Importable runtimes (for the format ``fmt`` only, when given), in order of preference."""
    names = resolve_format(fmt).runtime_names if fmt is not None else tuple(runtime_specs())
    return [r for r in names if runtime_status(r)[0]]


class Runner(Protocol):
    """A loaded artifact. ``run`` maps (N, C, H, W) float32 to (N, classes) float32."""

    path: Path
    runtime: str
    threads: int
    batch: int | None  # the graph's fixed batch size; None when dynamic
    metadata: ArtifactMetadata | None

    def run(self, x: np.ndarray) -> np.ndarray: ...


def _check_input(x: np.ndarray, sample_shape: Sequence[int] | None) -> np.ndarray:
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 4:
        raise ArtifactError(f"expected images (N, C, H, W), got shape {tuple(arr.shape)}")
    if sample_shape is not None and tuple(arr.shape[1:]) != tuple(sample_shape):
        raise ArtifactError(
            f"the model takes samples of shape {tuple(sample_shape)}, got {tuple(arr.shape[1:])}"
        )
    return arr


def _in_batches(x: np.ndarray, batch: int | None, run_one: Any) -> np.ndarray:
    """Run ``run_one`` on x whole (dynamic batch) or in slices of the fixed batch size."""
    if batch is None or len(x) == batch:
        return np.asarray(run_one(x))
    if len(x) == 0:
        raise ArtifactError("cannot run on an empty batch")
    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        short = batch - len(chunk)
        if short:  # pad the last slice to the fixed size, drop the padding's rows
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], short, axis=0)])
        outs.append(np.asarray(run_one(chunk))[: batch - short])
    return np.concatenate(outs)


class OnnxRunner:
    """An ONNX artifact in an ONNX Runtime session (CPU unless providers say otherwise)."""

    runtime = ONNXRUNTIME.name

    def __init__(
        self,
        path: Path,
        threads: int,
        metadata: ArtifactMetadata | None,
        providers: Sequence[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only
        try:
            self._session = ort.InferenceSession(
                str(path), options, providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise ArtifactError(f"onnxruntime cannot load {path} ({e})") from e
        self.path, self.threads, self.metadata = path, threads, metadata
        first = self._session.get_inputs()[0]
        self._input = first.name
        self.batch = first.shape[0] if isinstance(first.shape[0], int) else None
        dims = first.shape[1:]
        self._sample_shape = tuple(dims) if all(isinstance(d, int) for d in dims) else None

    def run(self, x: np.ndarray) -> np.ndarray:
        arr = _check_input(x, self._sample_shape)
        return _in_batches(arr, self.batch, lambda b: self._session.run(None, {self._input: b})[0])


def _quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """float -> the tensor's integer type with its (scale, zero point); identity for floats."""
    dtype = np.dtype(detail["dtype"])
    if not np.issubdtype(dtype, np.integer):
        return x.astype(dtype, copy=False)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    if not np.issubdtype(np.dtype(detail["dtype"]), np.integer):
        return y.astype(np.float32, copy=False)
    scale, zero = detail["quantization"]
    return ((y.astype(np.float32) - zero) * scale).astype(np.float32)


class TfliteRunner:
    """A TFLite artifact in a LiteRT interpreter (ai-edge-litert or tflite-runtime).

    Integer input/output tensors (full-int8 models) are converted with their
    scale and zero point, so callers always pass and receive float32.
    """

    def __init__(
        self, path: Path, threads: int, metadata: ArtifactMetadata | None, runtime: str
    ) -> None:
        module = importlib.import_module(runtime_specs()[runtime].module)
        try:
            self._interp = module.Interpreter(model_path=str(path), num_threads=threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise ArtifactError(f"{runtime} cannot load {path} ({e})") from e
        self.path, self.threads, self.metadata, self.runtime = path, threads, metadata, runtime
        inputs, outputs = self._interp.get_input_details(), self._interp.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ArtifactError(f"{path}: expected one input and one output tensor")
        self._in, self._out = inputs[0], outputs[0]
        signature = [int(d) for d in self._in["shape_signature"]]
        self.batch = signature[0] if signature[0] > 0 else None
        self._sample_shape = tuple(int(d) for d in self._in["shape"][1:])

    def _invoke(self, batch: np.ndarray) -> np.ndarray:
        if self.batch is None and tuple(self._in["shape"]) != batch.shape:
            self._interp.resize_tensor_input(self._in["index"], list(batch.shape))
            self._interp.allocate_tensors()
            self._in = self._interp.get_input_details()[0]
            self._out = self._interp.get_output_details()[0]
        self._interp.set_tensor(self._in["index"], _quantize(batch, self._in))
        self._interp.invoke()
        return _dequantize(self._interp.get_tensor(self._out["index"]), self._out)

    def run(self, x: np.ndarray) -> np.ndarray:
        arr = _check_input(x, self._sample_shape)
        return _in_batches(arr, self.batch, self._invoke)


class ProgramRunner:
    """An ExecuTorch inference program's ``forward`` in the ExecuTorch runtime (XNNPACK).

    The program takes batches of 1 to ``INFERENCE_MAX_BATCH`` samples; longer inputs run
    in slices. ``threads`` is the size of ExecuTorch's own thread pool, which it sizes
    itself.
    """

    runtime = EXECUTORCH.name
    batch: int | None = None  # dynamic: 1 to INFERENCE_MAX_BATCH samples a call

    def __init__(self, path: Path, threads: int, metadata: ArtifactMetadata | None) -> None:
        from executorch.runtime import Runtime

        from export.executorch_export import INFERENCE_MAX_BATCH
        from takfl.ondevice import METHOD

        try:
            self._method = Runtime.get().load_program(path).load_method(METHOD)
        except Exception as e:  # the runtime raises RuntimeError and its own types
            raise ArtifactError(f"executorch cannot load {path} ({e})") from e
        self.path, self.metadata, self.threads = path, metadata, _pool_threads(threads)
        self._max_batch = INFERENCE_MAX_BATCH
        self._sample_shape = tuple(metadata.input_shape) if metadata is not None else None

    def run(self, x: np.ndarray) -> np.ndarray:
        import torch

        arr = _check_input(x, self._sample_shape)
        if len(arr) == 0:
            raise ArtifactError("cannot run on an empty batch")
        n = self._max_batch
        outs = [
            self._method.execute([torch.from_numpy(arr[i : i + n])])[0].detach().numpy().copy()
            for i in range(0, len(arr), n)
        ]
        return np.concatenate(outs).astype(np.float32, copy=False)


def _pool_threads(requested: int) -> int:
    """The threads of ExecuTorch's pool, where its bindings tell; else ``requested``."""
    try:
        from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count
    except ImportError:
        return requested
    return int(_threadpool_get_thread_count())


def _metadata_for(path: Path, check_digest: bool) -> ArtifactMetadata | None:
    if sidecar_path(path).is_file():
        return read_metadata(path, check_digest=check_digest)
    return read_embedded_metadata(path)


def load_artifact(
    path: str | Path,
    *,
    runtime: str | None = None,
    threads: int = 1,
    providers: Sequence[str] | None = None,
    check_digest: bool = True,
) -> Runner:
    """Open an artifact (``.onnx``, ``.tflite``, an ExecuTorch inference program) for inference.

    Args:
        runtime: one of the runtimes of the artifact's format (``onnxruntime``,
            ``ai-edge-litert``, ``tflite-runtime``, ``executorch``); the first importable
            one when omitted.
        threads: CPU threads for the runtime (set explicitly, never the default).
        providers: ONNX Runtime execution providers (e.g. CUDA on a Jetson); CPU if None.
        check_digest: refuse an artifact whose SHA-256 differs from its sidecar.
    Returns:
        a :class:`Runner`; its ``metadata`` comes from the sidecar, else from the
        file itself, else is None.
    Raises:
        ArtifactError: missing, unreadable or unknown file, digest mismatch, a file
            that runs no inference (a training program).
        RuntimeUnavailableError: the runtime is not installed or not for this format.
    """
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"no artifact at {p}")
    return open_artifact(
        unit_for_path(p),
        p,
        runtime=runtime,
        threads=threads,
        providers=providers,
        check_digest=check_digest,
    )


def open_artifact(
    unit: FormatUnit,
    path: Path,
    *,
    runtime: str | None = None,
    threads: int = 1,
    providers: Sequence[str] | None = None,
    check_digest: bool = True,
) -> Runner:
    """:func:`load_artifact` for a file whose format unit is known already."""
    if threads < 1:
        raise ArtifactError(f"threads must be at least 1, got {threads}")
    if unit.load is None:
        raise ArtifactError(f"{path} is a {unit.title}; it runs no inference")
    names = unit.runtime_names
    if runtime is None:
        usable = available_runtimes(unit)
        if not usable:
            hints = "; ".join(r.install for r in unit.runtimes)
            raise RuntimeUnavailableError(f"no runtime for {unit.name} is installed: {hints}")
        runtime = usable[0]
    if runtime not in names:
        raise RuntimeUnavailableError(
            f"{runtime} does not run {unit.name} files; use {', '.join(names)}"
        )
    ok, reason = runtime_status(runtime)
    if not ok:
        raise RuntimeUnavailableError(reason)
    metadata = _metadata_for(path, check_digest)
    return unit.load(path, runtime=runtime, threads=threads, metadata=metadata, providers=providers)


def predict(
    path: str | Path, images: np.ndarray, *, runtime: str | None = None, threads: int = 1
) -> np.ndarray:
    """Logits (N, classes) of an artifact on normalised images (N, C, H, W)."""
    return load_artifact(path, runtime=runtime, threads=threads).run(images)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, classes) logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float32)


def top1(logits: np.ndarray, class_names: Sequence[str] | None = None) -> list[str]:
    """The predicted class of every row, by name when names are given."""
    idx = np.asarray(logits).argmax(axis=1)
    if class_names:
        return [str(class_names[i]) for i in idx]
    return [str(i) for i in idx]
