"""``takfl-agent predict``: an exported model run through the profile's runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edge_agent.cli import app
from edge_agent.predict_command import pick_artifact
from export.metadata import sign_sidecars
from export.pipeline import ExportOptions, export_checkpoint
from takfl.checkpoint import CheckpointMeta, save_checkpoint
from takfl.config import load_federation
from takfl.config.profile import TrainingSpec
from takfl.federation_data import build_federation_data
from takfl.models import build_model
from takfl.release.keys import generate_release_key, load_signer
from takfl.training import accuracy, train_local


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, Path]:
    """L's model trained on the digits private pool, exported to ONNX fp32, its sidecar
    signed with a fleet's release key (the root beside the export folder: ROOT)."""
    root = tmp_path_factory.mktemp("predict")
    cfg = load_federation("digits")
    data = build_federation_data(cfg, 0)
    xs = torch.cat([x for p, x, _ in data.clients.values() if p == "L"])
    ys = torch.cat([y for p, _, y in data.clients.values() if p == "L"])
    torch.manual_seed(0)
    model = build_model("cnn_digits_large", 10, (1, 8, 8))
    res = train_local(model, xs, ys, TrainingSpec(epochs=5, batch_size=32), seed=0)
    acc = accuracy(model, data.test_x, data.test_y)
    meta = CheckpointMeta(
        prototype="L",
        round=5,
        builder="cnn_digits_large",
        num_classes=10,
        input_shape=(1, 8, 8),
        builder_args={},
        class_names=data.pool.class_names,
        mean=data.pool.mean,
        std=data.pool.std,
    )
    ckpt = root / "L.safetensors"
    save_checkpoint(ckpt, res.state, meta)
    out = root / "exports" / "L"
    export_checkpoint(
        ckpt, "digits", out, prototype="L", options=ExportOptions(formats=["onnx"], latency_iters=2)
    )
    key, _root = generate_release_key(root / "fleet")
    assert sign_sidecars(out, load_signer(key))
    # raw (un-normalised) test images, as a device would hold them
    raw = (
        data.test_x.numpy() * np.asarray(data.pool.std)[None, :, None, None]
        + np.asarray(data.pool.mean)[None, :, None, None]
    )
    npz = root / "test.npz"
    np.savez(npz, x=raw.astype(np.float32), y=data.test_y.numpy())
    return out, acc, npz


def test_predict_runs_the_export_with_the_profiles_runtime(exported) -> None:  # type: ignore[no-untyped-def]
    folder, torch_acc, npz = exported
    result = CliRunner().invoke(
        app,
        [
            "predict",
            "--profile",
            "workstation",
            "--model",
            str(folder),
            "--input",
            str(npz),
            "--show",
            "3",
            "--release-root",
            str(fleet_root(folder)),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "L-round-5-fp32.onnx" in result.output
    line = next(x for x in result.output.splitlines() if x.startswith("accuracy on"))
    assert float(line.split(":")[1].strip().rstrip("%")) == pytest.approx(torch_acc, abs=0.01)


def test_pick_artifact_prefers_the_newest_round(tmp_path: Path) -> None:
    for r in (2, 10, 9):
        (tmp_path / f"M-round-{r}-int8.tflite").write_bytes(b"x")
    (tmp_path / "M-round-11-fp32.tflite").write_bytes(b"x")
    assert pick_artifact(tmp_path, "tflite", "int8").name == "M-round-10-int8.tflite"
    assert pick_artifact(tmp_path, "tflite", "none").name == "M-round-11-fp32.tflite"
    with pytest.raises(FileNotFoundError, match=r"no fp32 \.onnx"):
        pick_artifact(tmp_path, "onnx", "none")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (
            ["--profile", "workstation", "--model", "/nonexistent", "--input", "digits"],
            "no model file",
        ),
        (["--profile", "no-such-profile", "--model", ".", "--input", "digits"], "no such file"),
    ],
)
def test_predict_errors_are_clear(args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(app, ["predict", *args])
    assert result.exit_code == 2
    assert fragment in result.output
    assert "Traceback" not in result.output


def fleet_root(export_folder: Path) -> Path:
    """The root.json of the fleet whose key signed the fixture's sidecars."""
    return export_folder.parent.parent / "fleet" / "root.json"


def predict_args(model: Path, npz: Path, *extra: str, root: Path | None = None) -> list[str]:
    """``predict`` on ``model``, checked against the fleet ``root`` when one is given."""
    trust = [] if root is None else ["--release-root", str(root)]
    return [
        "predict",
        "--profile",
        "workstation",
        "--model",
        str(model),
        "--input",
        str(npz),
        *trust,
        *extra,
    ]


def copy_export(folder: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, dst))


TAMPERING = [
    ("missing-sidecar", "no sidecar"),
    ("model-changed", "SHA-256"),
    # the attacker rewrites the sidecar to match: the signature no longer covers it
    ("model-and-sidecar-rewritten", "not signed by the fleet's release key"),
    ("signatures-dropped", "carries no signature"),
    ("signed-by-another-key", "not signed by the fleet's release key"),
    ("signed-by-the-fleet-but-renamed", "prototype"),  # identity checks still apply
]


@pytest.mark.parametrize("tamper, fragment", TAMPERING, ids=[t for t, _ in TAMPERING])
def test_predict_refuses_an_unverified_export(  # type: ignore[no-untyped-def]
    exported, tmp_path: Path, tamper: str, fragment: str
) -> None:
    import json

    from securesystemslib.signer import CryptoSigner

    from export.metadata import file_sha256
    from takfl.release.signatures import sign_document

    folder, _acc, npz = exported
    copy = copy_export(folder, tmp_path / "L")
    model = next(copy.glob("*-fp32.onnx"))
    side = model.with_name(model.name + ".json")
    body = json.loads(side.read_text())
    if tamper == "missing-sidecar":
        side.unlink()
    elif tamper == "model-changed":
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF  # one flipped byte
        model.write_bytes(bytes(data))
    elif tamper == "model-and-sidecar-rewritten":
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF
        model.write_bytes(bytes(data))
        body["sha256"], body["size"] = file_sha256(model), len(data)
        side.write_text(json.dumps(body))
    elif tamper == "signatures-dropped":
        del body["signatures"]
        side.write_text(json.dumps(body))
    elif tamper == "signed-by-another-key":
        side.write_text(json.dumps(sign_document(body, CryptoSigner.generate_ed25519())))
    else:  # a fleet-signed sidecar of another prototype and round, put beside this model
        key = fleet_root(folder).with_name("release-key.pem")
        body["prototype"], body["round"] = "S", 99
        side.write_text(json.dumps(sign_document(body, load_signer(key))))
    result = CliRunner().invoke(
        app, predict_args(model, npz, root=fleet_root(folder)), terminal_width=300
    )
    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert fragment in output
    assert "Traceback" not in output


def test_predict_needs_the_fleets_root_to_trust_an_export(exported) -> None:  # type: ignore[no-untyped-def]
    folder, _acc, npz = exported
    model = next(folder.glob("*-fp32.onnx"))
    result = CliRunner().invoke(app, predict_args(model, npz), terminal_width=300)
    assert result.exit_code == 2, result.output
    assert "give --release-root" in " ".join(result.output.split())


def test_predict_runs_an_unverified_export_only_when_told(exported, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder, _acc, npz = exported
    copy = copy_export(folder, tmp_path / "L")
    model = next(copy.glob("*-fp32.onnx"))
    model.with_name(model.name + ".json").unlink()
    result = CliRunner().invoke(
        app, predict_args(model, npz, "--allow-unverified", "--show", "1"), terminal_width=300
    )
    assert result.exit_code == 0, result.output
    assert "without verifying" in result.output
