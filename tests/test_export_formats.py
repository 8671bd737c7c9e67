"""Export of every model family to ONNX and TFLite, reload, run, parity; artifact metadata.

Tiny instances of each family (small widths, 8x8 inputs) keep conversions fast;
inputs are the real digits images (repeated over three channels where needed).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from export.common import ArtifactError, ExportError, parse_choices
from export.data import ExportData, eval_data
from export.formats import artifact_filename, format_of, unit_for_path
from export.metadata import (
    ArtifactMetadata,
    read_embedded_metadata,
    read_metadata,
    sidecar_path,
)
from export.onnx_export import export_onnx
from export.pipeline import ExportOptions, export_model
from export.runtimes import RuntimeUnavailableError, load_artifact, runtime_status
from export.tflite_export import export_tflite, litert_torch_importable
from export.verify import FAILED, OK, SKIPPED
from takfl.checkpoint import CheckpointMeta
from takfl.config import load_federation
from takfl.data import load_digits
from takfl.models import build_model
from takfl.models.mobilenet import MobileNetV2
from takfl.models.resnet import ResNet
from takfl.models.small import MLP, SmallCNN
from takfl.models.vgg import VGG
from takfl.models.vit import ViT

pytestmark = pytest.mark.export

_LITERT_OK, _LITERT_WHY = litert_torch_importable()
needs_litert = pytest.mark.skipif(not _LITERT_OK, reason=_LITERT_WHY or "litert-torch missing")

# family -> (builder of a tiny instance, input channels)
TINY: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "mlp": (lambda: MLP(10, (1, 8, 8), width=8, depth=1), 1),
    "cnn": (lambda: SmallCNN(10, (1, 8, 8), widths=(4, 8), hidden=16), 1),
    "resnet": (lambda: ResNet([1, 1], [8, 16], 10, 3), 3),
    "vgg": (lambda: VGG([8, "M", 16, "M"], 10, (3, 8, 8)), 3),
    "vit": (lambda: ViT(10, (3, 8, 8), patch=4, dim=16, depth=1, heads=2, mlp_dim=32), 3),
    "mobilenet": (lambda: MobileNetV2(10, (3, 8, 8), width_mult=0.25), 3),
}
FP32_TOLERANCE = 1e-4
# The largest graph exports in the slow tier only; every other family stays in the fast one.
FAMILIES = [
    pytest.param(f, marks=pytest.mark.slow) if f == "mobilenet" else f for f in sorted(TINY)
]


@pytest.fixture(scope="module")
def digits_x() -> torch.Tensor:
    """48 real digits images, (48, 1, 8, 8) float32, normalised."""
    return load_digits().x[:48].contiguous()


def tiny_model(family: str) -> tuple[nn.Module, int]:
    """A tiny model of ``family`` in eval mode, BatchNorm statistics made non-trivial."""
    build, channels = TINY[family]
    torch.manual_seed(0)
    model = build()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval(), channels


def inputs_for(x: torch.Tensor, channels: int) -> torch.Tensor:
    return x.repeat(1, channels, 1, 1).contiguous()


def check_parity(path: Path, model: nn.Module, x: torch.Tensor) -> None:
    """Every installed runtime for the artifact's format reproduces PyTorch's logits."""
    with torch.inference_mode():
        ref = model(x).numpy()
    ran = 0
    for runtime in unit_for_path(path).runtime_names:
        if not runtime_status(runtime)[0]:
            continue
        out = load_artifact(path, runtime=runtime, threads=1).run(x.numpy())
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= FP32_TOLERANCE, runtime
        assert (out.argmax(1) == ref.argmax(1)).all()
        ran += 1
    assert ran >= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_export_runs_with_parity_and_dynamic_batch(
    family: str, digits_x: torch.Tensor, tmp_path: Path
) -> None:
    model, channels = tiny_model(family)
    x = inputs_for(digits_x, channels)

    res = export_onnx(model, x[:2], tmp_path / f"{family}.onnx")

    assert res.batch is None  # symbolic batch dimension for every family
    check_parity(res.path, model, x)  # 48 samples in one call through the dynamic batch


@needs_litert
@pytest.mark.parametrize("family", FAMILIES)
def test_tflite_export_runs_with_parity(
    family: str, digits_x: torch.Tensor, tmp_path: Path
) -> None:
    model, channels = tiny_model(family)
    x = inputs_for(digits_x, channels)[:12]

    res = export_tflite(model, x[:1], tmp_path / f"{family}.tflite")

    assert res.batch == 1
    check_parity(res.path, model, x)  # the runner loops over the fixed batch of 1


def test_onnx_export_carries_no_debug_metadata(digits_x: torch.Tensor, tmp_path: Path) -> None:
    import onnx

    model, _ = tiny_model("cnn")
    res = export_onnx(model, digits_x[:2], tmp_path / "m.onnx")

    proto = onnx.load(str(res.path))
    keys = {p.key for n in proto.graph.node for p in n.metadata_props}
    assert not any(k.startswith("pkg.torch.") for k in keys)
    assert str(Path.cwd()) not in res.path.read_bytes().decode("latin1")


# ---- metadata, sidecars, the loader ----------------------------------------------------


@pytest.fixture(scope="module")
def small_data() -> ExportData:
    return eval_data(load_federation("digits"), calibration_samples=64, test_samples=60)


def mlp_meta() -> CheckpointMeta:
    digits = load_digits()
    return CheckpointMeta(
        prototype="S",
        round=7,
        builder="mlp_digits",
        num_classes=10,
        input_shape=(1, 8, 8),
        builder_args={"width": 8},
        class_names=digits.class_names,
        mean=digits.mean,
        std=digits.std,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, small_data: ExportData) -> Path:
    """The tiny MLP exported to every format available here (float only)."""
    torch.manual_seed(0)
    model = build_model("mlp_digits", 10, (1, 8, 8), width=8).eval()
    out = tmp_path_factory.mktemp("exported")
    formats = ["onnx", "tflite"] if _LITERT_OK else ["onnx"]
    export_model(
        model, mlp_meta(), small_data, out, ExportOptions(formats=formats, latency_iters=2)
    )
    return out


def artifact_paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".onnx", ".tflite"))


def test_metadata_round_trips_through_sidecar_and_file(exported: Path) -> None:
    expected = mlp_meta()
    paths = artifact_paths(exported)
    assert {p.suffix for p in paths} == ({".onnx", ".tflite"} if _LITERT_OK else {".onnx"})
    for path in paths:
        from_sidecar = read_metadata(path)
        embedded = read_embedded_metadata(path)

        assert embedded == from_sidecar
        assert from_sidecar.prototype == "S" and from_sidecar.round == 7
        assert from_sidecar.builder == "mlp_digits"
        assert from_sidecar.builder_args == {"width": 8}
        assert from_sidecar.class_names == expected.class_names
        assert from_sidecar.mean == pytest.approx(expected.mean)
        assert from_sidecar.std == pytest.approx(expected.std)
        assert from_sidecar.input_shape == (1, 8, 8)
        assert from_sidecar.quantization == "none"
        assert from_sidecar.format == format_of(str(path))
        assert from_sidecar.batch == (None if path.suffix == ".onnx" else 1)
        side = json.loads(sidecar_path(path).read_text())
        assert side["size_bytes"] == path.stat().st_size and len(side["sha256"]) == 64


def test_strings_form_round_trips() -> None:
    meta = ArtifactMetadata.from_checkpoint(mlp_meta(), "onnx", "int8", batch=None, opset=18)

    assert ArtifactMetadata.from_strings(meta.to_strings()) == meta
    assert ArtifactMetadata.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta


def test_malformed_metadata_is_refused() -> None:
    with pytest.raises(ArtifactError, match="incomplete or malformed"):
        ArtifactMetadata.from_dict({"prototype": "S"})
    with pytest.raises(ArtifactError, match="not valid JSON"):
        ArtifactMetadata.from_strings({"input_shape": "[1, 8"})


def test_normalise_applies_recorded_statistics() -> None:
    meta = ArtifactMetadata.from_checkpoint(mlp_meta(), "onnx", "none", batch=None)
    raw = np.full((2, 1, 8, 8), 0.5, dtype=np.float32)

    out = meta.normalise(raw)

    assert np.allclose(out, (0.5 - meta.mean[0]) / meta.std[0])
    with pytest.raises(ArtifactError, match="expected images"):
        meta.normalise(np.zeros((2, 3, 8, 8), dtype=np.float32))


def test_loader_reports_metadata_and_refuses_a_tampered_artifact(
    exported: Path, tmp_path: Path
) -> None:
    source = next(p for p in artifact_paths(exported) if p.suffix == ".onnx")
    copy = tmp_path / source.name
    copy.write_bytes(source.read_bytes())
    sidecar_path(copy).write_text(sidecar_path(source).read_text())

    runner = load_artifact(copy, threads=1)
    assert runner.metadata is not None and runner.metadata.prototype == "S"
    assert runner.threads == 1 and runner.batch is None

    copy.write_bytes(source.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_artifact(copy, threads=1)


def test_loader_rejects_wrong_inputs_and_runtimes(exported: Path) -> None:
    onnx_path = next(p for p in artifact_paths(exported) if p.suffix == ".onnx")
    runner = load_artifact(onnx_path, threads=1)

    with pytest.raises(ArtifactError, match=r"shape \(1, 8, 8\)"):
        runner.run(np.zeros((2, 3, 8, 8), dtype=np.float32))
    with pytest.raises(RuntimeUnavailableError, match="does not run onnx"):
        load_artifact(onnx_path, runtime="ai-edge-litert")
    with pytest.raises(ArtifactError, match="no artifact"):
        load_artifact(onnx_path.with_name("missing.onnx"))
    with pytest.raises(ArtifactError, match="unknown artifact type"):
        load_artifact(sidecar_path(onnx_path))


def test_report_lists_every_runtime(exported: Path) -> None:
    report = json.loads((exported / "report.json").read_text())
    rows = {(r["format"], r["runtime"]): r for r in report["rows"]}

    assert rows[("torch", "torch")]["status"] == OK
    assert rows[("onnx", "onnxruntime")]["status"] == OK
    assert rows[("onnx", "onnxruntime")]["max_abs_diff"] <= FP32_TOLERANCE
    if _LITERT_OK:
        assert rows[("tflite", "ai-edge-litert")]["status"] == OK
        tflite_runtime = rows[("tflite", "tflite-runtime")]
        usable = runtime_status("tflite-runtime")[0]
        assert tflite_runtime["status"] == (OK if usable else SKIPPED)
        assert usable or tflite_runtime["reason"]  # a skipped runtime says why


class _HostRoundTrip(nn.Module):
    """Leaves the tensor world mid-graph (``.numpy()``): torch.export copes, litert does not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = torch.from_numpy(x.flatten(1).detach().numpy().copy())
        return self.fc(flat)


@needs_litert
def test_a_failing_format_is_a_failed_row_not_a_crash(
    small_data: ExportData, tmp_path: Path
) -> None:
    model = _HostRoundTrip().eval()
    meta = mlp_meta()

    report = export_model(
        model,
        meta,
        small_data,
        tmp_path,
        ExportOptions(formats=["tflite"], quantizations=["none", "dynamic"], latency_iters=2),
    )

    statuses = [(r.format, r.quantization, r.status) for r in report.rows]
    assert statuses == [
        ("torch", "none", OK),
        ("tflite", "none", FAILED),
        ("tflite", "dynamic", FAILED),
    ]
    assert "numpy" in report.rows[1].reason
    assert "float export failed" in report.rows[2].reason
    assert not report.ok
    assert (tmp_path / "report.json").is_file()


# ---- names and choices -----------------------------------------------------------------


def test_parse_choices_accepts_lists_and_names_unknown_items() -> None:
    assert parse_choices("onnx, tflite,onnx", ["onnx", "tflite"], "format") == ["onnx", "tflite"]
    with pytest.raises(ExportError, match="unknown format pt; choose from onnx, tflite"):
        parse_choices("onnx,pt", ["onnx", "tflite"], "format")
    with pytest.raises(ExportError, match="no format given"):
        parse_choices(" , ", ["onnx"], "format")


def test_artifact_names() -> None:
    assert artifact_filename("M", 10, "tflite", "int8") == "M-round-10-int8.tflite"
    assert artifact_filename("L", 3, "onnx", "none") == "L-round-3-fp32.onnx"
    assert format_of("a/b/M-round-1-fp32.ONNX") == "onnx"


def test_loader_modules_import_without_torch_or_converters() -> None:
    code = (
        "import sys, export, export.runtimes, export.metadata; "
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'litert_torch', "
        "'ai_edge_quantizer', 'ai_edge_litert') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == ""
