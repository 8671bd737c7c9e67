"""int8 quantisation on real data: a cnn_digits_small trained on digits, exported in every
format and quantisation, keeps its accuracy within a couple of points of float."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export.data import ExportData, eval_data
from export.metadata import read_embedded_metadata, read_metadata
from export.pipeline import ExportOptions, export_model
from export.report import ExportReport
from export.runtimes import load_artifact, runtime_status
from export.tflite_export import litert_torch_importable
from export.verify import OK, SKIPPED, VerifyRow
from takfl.checkpoint import CheckpointMeta
from takfl.config import load_federation
from takfl.config.profile import TrainingSpec
from takfl.federation_data import build_federation_data
from takfl.models import build_model
from takfl.training import accuracy, train_local

pytestmark = pytest.mark.export

_LITERT_OK, _LITERT_WHY = litert_torch_importable()
INT8_MAX_DROP = 2.0  # accuracy points an int8 artifact may lose against float


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, CheckpointMeta, ExportData]:
    """cnn_digits_small trained a few epochs on the digits federation's private pool."""
    cfg = load_federation("digits")
    fed = build_federation_data(cfg)
    x = torch.cat([cx for _, cx, _ in fed.clients.values()])
    y = torch.cat([cy for _, _, cy in fed.clients.values()])
    torch.manual_seed(0)
    model = build_model("cnn_digits_small", 10, (1, 8, 8))
    train_local(model, x, y, TrainingSpec(epochs=6, batch_size=32), seed=0)
    model.eval()
    assert accuracy(model, fed.test_x, fed.test_y) > 90.0  # a real model, not noise
    meta = CheckpointMeta(
        prototype="M",
        round=1,
        builder="cnn_digits_small",
        num_classes=10,
        input_shape=(1, 8, 8),
        builder_args={},
        class_names=fed.pool.class_names,
        mean=fed.pool.mean,
        std=fed.pool.std,
    )
    return model, meta, eval_data(cfg, calibration_samples=256)


@pytest.fixture(scope="module")
def report(
    trained: tuple[torch.nn.Module, CheckpointMeta, ExportData],
    tmp_path_factory: pytest.TempPathFactory,
) -> ExportReport:
    model, meta, data = trained
    formats = ["onnx", "tflite"] if _LITERT_OK else ["onnx"]
    options = ExportOptions(
        formats=formats, quantizations=["none", "int8", "dynamic"], latency_iters=3
    )
    return export_model(model, meta, data, tmp_path_factory.mktemp("quant"), options)


def rows_of(report: ExportReport, fmt: str, quantization: str) -> list[VerifyRow]:
    return [
        r
        for r in report.rows
        if r.format == fmt and r.quantization == quantization and r.status == OK
    ]


@pytest.mark.parametrize(
    "fmt",
    [
        "onnx",
        pytest.param("tflite", marks=pytest.mark.skipif(not _LITERT_OK, reason=_LITERT_WHY)),
    ],
)
def test_int8_keeps_accuracy_and_shrinks_the_file(
    report: ExportReport, trained: tuple[torch.nn.Module, CheckpointMeta, ExportData], fmt: str
) -> None:
    model, _, data = trained
    with torch.inference_mode():
        ref = model(data.test_x)
    logit_range = float(ref.max() - ref.min())
    (torch_row,) = rows_of(report, "torch", "none")
    fp32 = rows_of(report, fmt, "none")
    int8 = rows_of(report, fmt, "int8")
    dynamic = rows_of(report, fmt, "dynamic")
    assert fp32 and int8 and dynamic  # at least one runtime ran each artifact

    for row in fp32:
        assert row.max_abs_diff is not None and row.max_abs_diff <= 1e-4
        assert row.accuracy == pytest.approx(torch_row.accuracy)
    for row in int8 + dynamic:
        assert row.accuracy is not None and torch_row.accuracy is not None
        assert row.accuracy >= torch_row.accuracy - INT8_MAX_DROP
        assert row.agreement is not None and row.agreement >= 95.0
        # ranges calibrated over the whole public set: no saturated logits
        assert row.max_abs_diff is not None and row.max_abs_diff <= 0.05 * logit_range
    assert int8[0].size_mb is not None and fp32[0].size_mb is not None
    assert int8[0].size_mb < 0.5 * fp32[0].size_mb


def test_every_row_verified_or_says_why_not(report: ExportReport) -> None:
    for row in report.rows:
        usable = row.runtime == "torch" or runtime_status(row.runtime)[0]
        assert row.status == (OK if usable else SKIPPED), (row.runtime, row.reason)
        if row.status == OK:
            assert row.p50_ms is not None and row.p90_ms is not None
            assert 0 < row.p50_ms <= row.p90_ms
            assert row.threads == 1
        else:
            assert row.reason
    assert report.ok


@pytest.mark.skipif(not _LITERT_OK, reason=_LITERT_WHY)
def test_full_integer_tflite_is_run_in_float_by_the_loader(
    report: ExportReport, trained: tuple[torch.nn.Module, CheckpointMeta, ExportData]
) -> None:
    from ai_edge_litert.interpreter import Interpreter

    path = Path(report.artifacts()["tflite/int8"])
    detail = Interpreter(model_path=str(path)).get_input_details()[0]
    assert np.dtype(detail["dtype"]) == np.int8  # integer input tensor on the wire
    io = json.loads(Path(str(path) + ".json").read_text())["io_quantization"]
    assert io["input"]["dtype"] == "int8" and io["output"]["dtype"] == "int8"
    assert io["input"]["scale"] == pytest.approx(float(detail["quantization"][0]))
    assert io["input"]["scale"] > 0 and io["input"]["shape"] == [1, 1, 8, 8]

    _, _, data = trained
    logits = load_artifact(path, runtime="ai-edge-litert", threads=1).run(data.test_x[:5].numpy())

    assert logits.dtype == np.float32 and logits.shape == (5, 10)
    assert (logits.argmax(1) == data.test_y[:5].numpy()).mean() >= 0.6


def test_report_json_matches_the_report(report: ExportReport) -> None:
    on_disk = json.loads((Path(report.out_dir) / "report.json").read_text())

    assert on_disk["ok"] is True
    assert len(on_disk["rows"]) == len(report.rows)
    assert set(on_disk["artifacts"]) == set(report.artifacts())
    for key, path in report.artifacts().items():
        fmt, quantization = key.split("/")
        meta = read_metadata(path)
        assert (meta.format, meta.quantization) == (fmt, quantization)
        assert read_embedded_metadata(path) == meta  # embedded in quantised files too
