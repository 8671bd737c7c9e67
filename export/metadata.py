"""What every exported artifact says about itself, and the JSON sidecar that carries it.

An artifact (``model.onnx``, ``model.tflite``, ``model-xnnpack.pte``) is accompanied by
``model.onnx.json``: the metadata below plus the artifact's SHA-256 and size,
so a device can check what it downloaded and knows the class names and the
normalisation without the checkpoint. The same metadata is embedded in the
artifact itself where its format allows; how, is its format unit's business
(:mod:`export.formats`).

This module imports only the standard library and NumPy: the edge agent reads
metadata with nothing else installed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.common import (
    ARTIFACT_SCHEMA,
    INPUT_NAME,
    OUTPUT_NAME,
    SIDECAR_SUFFIX,
    ArtifactError,
)
from export.formats import unit_for_path
from takfl.files import atomic_write_text

if TYPE_CHECKING:
    from securesystemslib.signer import Signer
    from tuf.api.metadata import Root

    from export.formats import Built, FormatUnit
    from takfl.checkpoint import CheckpointMeta

_JSON_FIELDS = ("builder_args", "input_shape", "class_names", "mean", "std")
_INT_FIELDS = ("schema", "round", "num_classes")
_OPTIONAL_INT_FIELDS = ("batch", "opset")


def _producer() -> str:
    try:
        from importlib.metadata import version

        return f"takfl-edge {version('takfl-edge')}"
    except Exception:  # not installed as a distribution (source tree)
        return "takfl-edge"


@dataclass(frozen=True, kw_only=True)
class ArtifactMetadata:
    """Identity, interface and preprocessing of one exported model."""

    prototype: str
    round: int
    builder: str  # model zoo name, e.g. "cnn_digits_small"
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of one sample
    format: str  # the name of its format unit: "onnx", "tflite", "executorch"...
    quantization: str  # "none" | "int8" | "dynamic"
    builder_args: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)  # per channel, see normalise()
    std: list[float] = field(default_factory=list)
    batch: int | None = None  # fixed batch size of the graph; None = dynamic
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    opset: int | None = None  # ONNX opset; None for TFLite
    producer: str = field(default_factory=_producer)
    schema: int = ARTIFACT_SCHEMA

    @classmethod
    def from_checkpoint(
        cls,
        meta: CheckpointMeta,
        fmt: str,
        quantization: str,
        *,
        batch: int | None,
        opset: int | None = None,
        input_name: str = INPUT_NAME,
        output_name: str = OUTPUT_NAME,
    ) -> ArtifactMetadata:
        """Metadata of an artifact exported from a checkpoint described by ``meta``."""
        return cls(
            prototype=meta.prototype,
            round=int(meta.round),
            builder=meta.builder,
            num_classes=int(meta.num_classes),
            input_shape=(
                int(meta.input_shape[0]),
                int(meta.input_shape[1]),
                int(meta.input_shape[2]),
            ),
            format=fmt,
            quantization=quantization,
            builder_args=dict(meta.builder_args),
            class_names=list(meta.class_names),
            mean=[float(v) for v in meta.mean],
            std=[float(v) for v in meta.std],
            batch=batch,
            opset=opset,
            input_name=input_name,
            output_name=output_name,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "metadata") -> ArtifactMetadata:
        """Inverse of :meth:`to_dict`; unknown keys (sha256, size...) are ignored."""
        known = {f for f in cls.__dataclass_fields__}
        try:
            values = {k: v for k, v in data.items() if k in known}
            shape = values["input_shape"]
            values["input_shape"] = (int(shape[0]), int(shape[1]), int(shape[2]))
            for k in _INT_FIELDS:
                if k in values:
                    values[k] = int(values[k])
            for k in _OPTIONAL_INT_FIELDS:
                if values.get(k) is not None:
                    values[k] = int(values[k])
            return cls(**values)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ArtifactError(f"{source}: metadata is incomplete or malformed ({e})") from e

    def to_strings(self) -> dict[str, str]:
        """Flat string map (ONNX ``metadata_props``): lists and mappings as JSON."""
        out: dict[str, str] = {}
        for k, v in self.to_dict().items():
            if k in _JSON_FIELDS:
                out[k] = json.dumps(v, sort_keys=True)
            else:
                out[k] = "" if v is None else str(v)
        return out

    @classmethod
    def from_strings(cls, props: dict[str, str], source: str = "metadata") -> ArtifactMetadata:
        """Inverse of :meth:`to_strings`."""
        data: dict[str, Any] = {}
        try:
            for k, v in props.items():
                if k in _JSON_FIELDS:
                    data[k] = json.loads(v)
                elif k in _OPTIONAL_INT_FIELDS:
                    data[k] = int(v) if v else None
                else:
                    data[k] = v
        except ValueError as e:
            raise ArtifactError(f"{source}: metadata field is not valid JSON ({e})") from e
        return cls.from_dict(data, source)

    def normalise(self, images: np.ndarray) -> np.ndarray:
        """Apply the per-channel standardisation the model was trained with.

        ``images``: float (N, C, H, W), scaled as the data set's loader scales
        raw pixels (digits: value / 16; image data sets: value / 255). Returns
        float32 (N, C, H, W) ready for the model. Identity when no statistics
        were recorded.
        """
        x = np.asarray(images, dtype=np.float32)
        if not self.mean:
            return x
        if x.ndim != 4 or x.shape[1] != len(self.mean):
            raise ArtifactError(
                f"expected images (N, {len(self.mean)}, H, W), got shape {tuple(x.shape)}"
            )
        mean = np.asarray(self.mean, dtype=np.float32)[None, :, None, None]
        std = np.asarray(self.std, dtype=np.float32)[None, :, None, None]
        return ((x - mean) / std).astype(np.float32)


def sidecar_path(artifact: str | Path) -> Path:
    """``model.tflite`` -> ``model.tflite.json``."""
    p = Path(artifact)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_sidecar(artifact: str | Path, meta: ArtifactMetadata, **extra: Any) -> Path:
    """Write ``<artifact>.json``: metadata, file name, SHA-256 and size, plus ``extra``."""
    p = Path(artifact)
    body = (
        meta.to_dict()
        | extra
        | {
            "file": p.name,
            "sha256": file_sha256(p),
            "size_bytes": p.stat().st_size,
        }
    )
    out = sidecar_path(p)
    atomic_write_text(out, json.dumps(body, indent=2, sort_keys=True) + "\n")
    return out


def read_sidecar(artifact: str | Path, *, check_digest: bool = True) -> dict[str, Any]:
    """The sidecar of ``artifact`` as a dict; with ``check_digest`` the artifact's
    SHA-256 must equal the recorded one (a replaced or truncated file is refused)."""
    p = Path(artifact)
    side = sidecar_path(p)
    try:
        data = json.loads(side.read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"no sidecar {side} for {p}") from e
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{side} is not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{side}: expected a JSON object")
    if check_digest and data.get("sha256") != file_sha256(p):
        raise ArtifactError(
            f"{p} does not match the SHA-256 in {side.name}; the file was replaced or "
            "damaged: download or export it again"
        )
    return data


_IDENTITY_FIELDS = ("prototype", "round", "builder", "num_classes", "input_shape", "format")


def sign_sidecar(artifact: str | Path, signer: Signer) -> Path:
    """Sign ``artifact``'s sidecar with the fleet's release key (rewritten atomically):
    its SHA-256 and metadata then cannot be rewritten along with a replaced file."""
    from takfl.release.signatures import sign_document

    side = sidecar_path(artifact)
    data = read_sidecar(artifact, check_digest=True)
    atomic_write_text(
        side, json.dumps(sign_document(data, signer), indent=2, sort_keys=True) + "\n"
    )
    return side


def _is_artifact(path: Path) -> bool:
    try:
        unit_for_path(path)
    except ArtifactError:
        return False
    return True


def sign_sidecars(folder: str | Path, signer: Signer) -> list[Path]:
    """Sign the sidecar of every artifact under ``folder`` (an export folder or a run's
    ``exports/``); the sidecars signed."""
    signed = []
    for side in sorted(Path(folder).rglob(f"*{SIDECAR_SUFFIX}")):
        artifact = side.with_name(side.name.removesuffix(SIDECAR_SUFFIX))
        if artifact.is_file() and _is_artifact(artifact):
            signed.append(sign_sidecar(artifact, signer))
    return signed


def verify_sidecar(artifact: str | Path, root: Root | None = None) -> ArtifactMetadata:
    """The metadata of ``artifact`` from its sidecar, which must exist and match: the
    file's SHA-256 and size, its name and format, and (where the file carries metadata
    readable here) the prototype, round, builder, classes and input shape embedded in it;
    with ``root`` (the fleet's root.json), the sidecar must also be signed by the fleet's
    release key. Raises :class:`ArtifactError` naming what differs."""
    p = Path(artifact)
    if not p.is_file():
        raise ArtifactError(f"no artifact at {p}")
    side = sidecar_path(p)
    if not side.is_file():
        raise ArtifactError(
            f"{p} has no sidecar {side.name} to verify it against; export it again, or pass "
            "--allow-unverified to run it anyway"
        )
    data = read_sidecar(p, check_digest=True)
    if root is not None:
        from takfl.release.signatures import SignatureError, verify_document

        try:
            verify_document(data, root)
        except SignatureError as e:
            raise ArtifactError(
                f"{side.name} cannot be trusted: {e}; export it again with the fleet's release "
                "key (takfl-export --sign-with), or pass --allow-unverified to run it anyway"
            ) from e
    meta = ArtifactMetadata.from_dict(data, str(side))
    problems = []
    if data.get("file") != p.name:
        problems.append(f"names file {data.get('file')!r}, not {p.name!r}")
    if data.get("size_bytes") != p.stat().st_size:
        problems.append(f"size {data.get('size_bytes')} != {p.stat().st_size} bytes")
    fmt = unit_for_path(p).name
    if meta.format != fmt:
        problems.append(f"format {meta.format!r}, file is {fmt!r}")
    embedded = read_embedded_metadata(p)
    if embedded is not None:
        for name in _IDENTITY_FIELDS:
            if getattr(embedded, name) != getattr(meta, name):
                problems.append(
                    f"{name} {getattr(meta, name)!r}, the file says {getattr(embedded, name)!r}"
                )
    if problems:
        raise ArtifactError(f"{side.name} does not describe {p.name}: " + "; ".join(problems))
    return meta


def read_metadata(artifact: str | Path, *, check_digest: bool = True) -> ArtifactMetadata:
    """Metadata of an artifact: from its sidecar when present, else embedded in the file."""
    p = Path(artifact)
    if not p.is_file():
        raise ArtifactError(f"no artifact at {p}")
    if sidecar_path(p).is_file():
        return ArtifactMetadata.from_dict(read_sidecar(p, check_digest=check_digest), str(p))
    embedded = read_embedded_metadata(p)
    if embedded is None:
        raise ArtifactError(
            f"{p} has neither a sidecar ({sidecar_path(p).name}) nor "
            "embedded metadata readable with the packages installed"
        )
    return embedded


def read_embedded_metadata(artifact: str | Path) -> ArtifactMetadata | None:
    """Metadata stored inside the artifact, or None when absent or not readable here."""
    p = Path(artifact)
    return unit_for_path(p).read_embedded(p)


def stamp_artifact(unit: FormatUnit, built: Built, quantization: str, meta: CheckpointMeta) -> Path:
    """Embed the metadata of ``built`` where its format allows, then write its sidecar
    (digest last); returns the sidecar's path."""
    art = ArtifactMetadata.from_checkpoint(
        meta,
        unit.name,
        quantization,
        batch=built.batch,
        opset=built.opset,
        input_name=built.input_name,
        output_name=built.output_name,
    )
    return write_sidecar(built.path, art, **unit.stamp(built, art))
