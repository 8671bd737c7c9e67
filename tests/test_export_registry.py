"""The export format registry: every format a unit with its suffix, quantisations, runtimes
and steps; names resolved once at the entry point, unknown names and missing quantisations
refused with what there is."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import export.formats
from export.cli import EXIT_BAD_INPUT, app
from export.common import QUANTIZATIONS, ArtifactError, ExportError
from export.data import ExportData
from export.formats import (
    FLOAT,
    BuildJob,
    Built,
    FormatUnit,
    VerifyJob,
    format_names,
    format_units,
    profile_format,
    resolve_format,
    resolve_formats,
    unit_for_path,
)
from export.metadata import read_metadata
from export.pipeline import ExportOptions, export_model
from export.runtimes import load_artifact, runtime_status
from export.verify import OK, VerifyRow
from takfl.checkpoint import CheckpointMeta
from takfl.config.profile import TrainingSpec
from takfl.data import load_digits
from takfl.models import build_model

KNOWN = "onnx, tflite, executorch, executorch-training"
# name -> (suffix, quantisations, runtimes, runs inference)
EXPECTED: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], bool]] = {
    "onnx": (".onnx", ("none", "int8", "dynamic"), ("onnxruntime",), True),
    "tflite": (
        ".tflite",
        ("none", "int8", "dynamic"),
        ("ai-edge-litert", "tflite-runtime"),
        True,
    ),
    "executorch": ("-xnnpack.pte", ("none",), ("executorch",), True),
    "executorch-training": ("-train.pte", ("none",), ("executorch",), False),
}


def test_every_format_is_a_unit_with_its_suffix_quantisations_and_runtimes() -> None:
    units = format_units()

    assert tuple(units) == format_names() == tuple(EXPECTED)
    for name, (suffix, quantizations, runtimes, runs_inference) in EXPECTED.items():
        unit = units[name]
        assert unit.name == name and unit.suffix == suffix
        assert unit.quantizations == quantizations
        assert set(unit.quantizations) <= set(QUANTIZATIONS)
        assert unit.runtime_names == runtimes
        assert (unit.load is not None) == runs_inference
        for runtime in runtimes:  # every declared runtime is one the loader knows
            assert "unknown runtime" not in runtime_status(runtime)[1]


def test_an_unknown_format_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ExportError, match=f"unknown format foo; choose from {KNOWN}$"):
        resolve_format("foo")
    with pytest.raises(ExportError, match="unknown format coreml, pt; choose from onnx"):
        resolve_formats("onnx,coreml,pt")
    with pytest.raises(ExportError, match="no format given"):
        resolve_formats(" , ")
    with pytest.raises(ExportError, match="unknown format foo"):
        ExportOptions(formats=["foo"])


def test_takfl_export_names_the_known_formats(tmp_path: Path) -> None:
    args = ["--checkpoint", str(tmp_path / "M.safetensors"), "--config", "digits"]

    result = CliRunner().invoke(app, [*args, "--format", "foo"])

    output = " ".join(result.output.split())
    assert result.exit_code == EXIT_BAD_INPUT
    assert f"unknown format foo; choose from {KNOWN}" in output
    assert "Traceback" not in output


def test_a_quantisation_the_format_lacks_is_an_error() -> None:
    with pytest.raises(
        ExportError, match="format executorch has no int8 quantisation; it has none"
    ):
        ExportOptions(formats=["onnx", "executorch"], quantizations=["none", "int8"])
    with pytest.raises(ExportError, match="unknown quantization int4"):
        resolve_format("onnx").quantizer("int4")

    options = ExportOptions(formats=["onnx", "tflite"], quantizations=["int8", "dynamic"])
    assert [u.name for u in options.units] == ["onnx", "tflite"]


def test_names_resolve_in_order_without_duplicates_and_units_pass_through() -> None:
    tflite = resolve_format("tflite")

    units = resolve_formats(["TFLite", "onnx", "tflite", tflite])

    assert [u.name for u in units] == ["tflite", "onnx"]
    assert units[0] is tflite and resolve_format(tflite) is tflite


def test_file_names_and_paths_map_to_their_units() -> None:
    names = {unit.name: unit.filename("S", 4, FLOAT) for unit in format_units().values()} | {
        "int8": resolve_format("tflite").filename("M", 10, "int8")
    }

    assert names == {
        "onnx": "S-round-4-fp32.onnx",
        "tflite": "S-round-4-fp32.tflite",
        "executorch": "S-round-4-xnnpack.pte",
        "executorch-training": "S-round-4-train.pte",
        "int8": "M-round-10-int8.tflite",
    }
    for name, filename in list(names.items())[:4]:
        assert unit_for_path(Path("a") / filename).name == name
    assert resolve_format("onnx").artifact_glob("dynamic") == "*-dynamic.onnx"
    with pytest.raises(ArtifactError, match=r"unknown artifact type; expected one of \.onnx"):
        unit_for_path("model.pte")


def test_a_profile_that_runs_torch_gets_onnx() -> None:
    assert profile_format("torch") is resolve_format("onnx")
    assert profile_format("tflite") is resolve_format("tflite")


def test_a_training_program_is_not_loaded_for_inference(tmp_path: Path) -> None:
    program = tmp_path / "S-round-1-train.pte"
    program.write_bytes(b"not run")

    with pytest.raises(ArtifactError, match="is a training program; it runs no inference"):
        load_artifact(program)


def test_import_export_formats_loads_no_converter_or_runtime() -> None:
    code = (
        "import sys, export.formats; "
        "heavy = [m for m in ('torch', 'numpy', 'onnx', 'onnxruntime', 'onnxslim', "
        "'litert_torch', 'ai_edge_litert', 'ai_edge_quantizer', 'tflite_runtime', "
        "'executorch') if m in sys.modules]; "
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


# ---- the pipeline uses the units it was given, looking no name up again -----------------


class Calls:
    def __init__(self) -> None:
        self.steps: list[tuple[str, str]] = []


def fake_unit(calls: Calls) -> FormatUnit:
    """A format the registry does not know: any lookup of its name would fail."""

    def export_float(job: BuildJob) -> Built:
        calls.steps.append(("export", job.path.name))
        job.path.write_bytes(b"float")
        return Built(path=job.path, batch=1)

    def quantize(base: Built, path: Path, calibration: torch.Tensor, threads: int) -> Built:
        calls.steps.append(("quantize", path.name))
        path.write_bytes(b"int8")
        return base.variant(path, [])

    def stamp(built: Built, meta: Any) -> dict[str, Any]:
        calls.steps.append(("stamp", built.path.name))
        return {"embedded_metadata": False}

    def verify(built: Built, job: VerifyJob) -> list[VerifyRow]:
        calls.steps.append(("verify", built.path.name))
        return [
            VerifyRow(
                prototype=job.prototype,
                format=job.unit.name,
                quantization=job.quantization,
                runtime="fake-runtime",
                status=OK,
                artifact=str(built.path),
            )
        ]

    return FormatUnit(
        name="fake",
        title="fake model",
        suffix=".fake",
        quantization_in_name=True,
        export=export_float,
        quantizers={"int8": quantize},
        runtimes=(),
        load=None,
        stamp=stamp,
        read_embedded=lambda path: None,
        verify=verify,
    )


def tiny_data() -> ExportData:
    digits = load_digits()
    return ExportData(
        calibration=digits.x[:4].float(),
        test_x=digits.x[4:10].float(),
        test_y=digits.y[4:10].long(),
        num_classes=10,
        description="6 digits",
    )


def test_export_model_runs_the_units_it_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: options resolved, then the registry emptied, so any later lookup fails
    calls = Calls()
    options = ExportOptions(formats=[fake_unit(calls)], quantizations=["int8"], latency_iters=1)
    monkeypatch.setattr(export.formats, "_UNITS", {})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    meta = CheckpointMeta(
        prototype="P", round=2, builder="mlp_digits", num_classes=10, input_shape=(1, 8, 8)
    )
    # Execute
    report = export_model(model, meta, tiny_data(), tmp_path, options)
    # Assert: float first, then int8 from it, each stamped then verified
    assert calls.steps == [
        ("export", "P-round-2-fp32.fake"),
        ("stamp", "P-round-2-fp32.fake"),
        ("verify", "P-round-2-fp32.fake"),
        ("quantize", "P-round-2-int8.fake"),
        ("stamp", "P-round-2-int8.fake"),
        ("verify", "P-round-2-int8.fake"),
    ]
    assert [(r.format, r.quantization, r.status) for r in report.rows] == [
        ("torch", "none", OK),
        ("fake", "none", OK),
        ("fake", "int8", OK),
    ]
    side = json.loads((tmp_path / "P-round-2-int8.fake.json").read_text())
    assert side["format"] == "fake" and side["quantization"] == "int8"
    assert side["embedded_metadata"] is False and side["file"] == "P-round-2-int8.fake"


# ---- ExecuTorch programs through the same pipeline ---------------------------------------

needs_executorch = pytest.mark.skipif(
    importlib.util.find_spec("executorch") is None,
    reason="executorch is not installed (pip install 'takfl-edge[executorch]')",
)


@needs_executorch
@pytest.mark.export
def test_export_model_reports_both_programs(tmp_path: Path) -> None:
    # Prepare
    torch.manual_seed(0)
    model = build_model("mlp_digits", 10, (1, 8, 8), width=16).eval()
    meta = CheckpointMeta(
        prototype="S", round=3, builder="mlp_digits", num_classes=10, input_shape=(1, 8, 8)
    )
    options = ExportOptions(formats=["executorch", "executorch-training"], latency_iters=2)
    training = TrainingSpec(epochs=1, batch_size=8, optimizer="sgd", learning_rate=0.05)
    # Execute
    report = export_model(model, meta, tiny_data(), tmp_path, options, training=training)
    # Assert: the inference program ran in the ExecuTorch runtime like torch; the training
    # program passed its own check; both carry their sidecars
    rows = {r.format: r for r in report.rows}
    assert [r.format for r in report.rows] == ["torch", "executorch", "executorch-training"]
    assert report.ok
    inference, training_row = rows["executorch"], rows["executorch-training"]
    assert inference.runtime == "executorch" and inference.status == OK
    assert inference.max_abs_diff is not None and inference.max_abs_diff <= 1e-4
    assert inference.accuracy == pytest.approx(rows["torch"].accuracy)
    assert training_row.status == OK and "SGD steps on real samples" in training_row.reason
    assert training_row.max_abs_diff is not None and training_row.max_abs_diff <= 1e-4
    program = tmp_path / "S-round-3-xnnpack.pte"
    assert read_metadata(program).format == "executorch"
    logits = load_artifact(program).run(np.repeat(tiny_data().test_x.numpy(), 20, axis=0))
    assert logits.shape == (120, 10)  # more samples than one call of the program takes
    side = json.loads((tmp_path / "S-round-3-train.pte.json").read_text())
    assert side["format"] == "executorch-training" and side["max_batch"] == 8
