"""``takfl-export`` end to end: clear errors on bad input, artifacts and reports on good input,
and the run mode the coordinator uses at the end of a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from export.cli import EXIT_BAD_INPUT, EXIT_OK, app
from export.common import ArtifactError
from export.pipeline import export_checkpoint
from export.run_export import export_run, latest_checkpoint
from export.tflite_export import litert_torch_importable
from profiles import __file__ as profiles_init
from takfl.checkpoint import CheckpointError, CheckpointMeta, save_checkpoint
from takfl.config import load_federation, prototype_model
from takfl.data import load_digits
from takfl.models import build_model

pytestmark = pytest.mark.export

_LITERT_OK, _LITERT_WHY = litert_torch_importable()
DIGITS_YAML = Path(profiles_init).parent / "federations" / "digits.yaml"
# The digits federation's prototypes and the models its config gives them.
_DIGITS = load_federation(DIGITS_YAML)
MODELS = {
    p.name: (prototype_model(_DIGITS, p.name).builder, prototype_model(_DIGITS, p.name).args)
    for p in _DIGITS.prototypes
}

runner = CliRunner()


def write_checkpoint(
    path: Path,
    prototype: str,
    builder: str,
    args: dict[str, Any],
    round_: int = 1,
    state_from: str | None = None,
) -> Path:
    """An (untrained) checkpoint; ``state_from`` stores another builder's tensors."""
    digits = load_digits()
    torch.manual_seed(round_)
    model = build_model(state_from or builder, 10, (1, 8, 8), **({} if state_from else args))
    meta = CheckpointMeta(
        prototype=prototype,
        round=round_,
        builder=builder,
        num_classes=10,
        input_shape=(1, 8, 8),
        builder_args=args,
        class_names=digits.class_names,
        mean=digits.mean,
        std=digits.std,
    )
    save_checkpoint(path, model.state_dict(), meta)
    return path


def invoke(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def assert_clean_error(code: int, output: str, *fragments: str) -> None:
    assert code == EXIT_BAD_INPUT
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in " ".join(output.split()), output


def test_corrupt_checkpoint_is_a_clean_error(tmp_path: Path) -> None:
    bad = tmp_path / "M.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")

    code, output = invoke("--checkpoint", bad, "--config", "digits", "--out", tmp_path / "o")

    assert_clean_error(code, output, "not a readable safetensors checkpoint")
    assert not (tmp_path / "o").exists()


def test_checkpoint_of_another_model_than_the_config_gives(tmp_path: Path) -> None:
    other = MODELS["L"][0]
    assert other != MODELS["M"][0]
    ckpt = write_checkpoint(tmp_path / "M.safetensors", "M", other, {})

    code, output = invoke("--checkpoint", ckpt, "--config", "digits", "--prototype", "M")

    assert_clean_error(code, output, other, "the config gives prototype 'M'", MODELS["M"][0])
    with pytest.raises(CheckpointError, match="config gives"):
        export_checkpoint(ckpt, "digits", tmp_path / "o", prototype="M")


def test_checkpoint_whose_tensors_do_not_match_its_model(tmp_path: Path) -> None:
    ckpt = write_checkpoint(
        tmp_path / "M.safetensors", "M", *MODELS["M"], state_from=MODELS["L"][0]
    )  # metadata and tensors disagree

    code, output = invoke("--checkpoint", ckpt, "--config", "digits")

    assert_clean_error(code, output, "does not match its model", "shape mismatch")
    with pytest.raises(CheckpointError, match="does not match its model"):
        export_checkpoint(ckpt, "digits", tmp_path / "o")


def test_unknown_prototype_and_wrong_prototype(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "M.safetensors", "M", *MODELS["M"])

    code, output = invoke("--checkpoint", ckpt, "--config", "digits", "--prototype", "Z")
    assert_clean_error(code, output, "unknown prototype 'Z'", "S, M, L")

    code, output = invoke("--checkpoint", ckpt, "--config", "digits", "--prototype", "L")
    assert_clean_error(code, output, "checkpoint of prototype 'M', not 'L'")


def test_unknown_format_and_quantisation(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "M.safetensors", "M", *MODELS["M"])

    code, output = invoke("--checkpoint", ckpt, "--config", "digits", "--formats", "onnx,coreml")
    assert_clean_error(code, output, "unknown format coreml", "choose from onnx, tflite")

    code, output = invoke("--checkpoint", ckpt, "--config", "digits", "--quantize", "int4")
    assert_clean_error(code, output, "unknown quantization int4")


def test_needs_exactly_one_source(tmp_path: Path) -> None:
    code, output = invoke("--out", tmp_path)
    assert_clean_error(code, output, "either --checkpoint")

    ckpt = write_checkpoint(tmp_path / "S.safetensors", "S", *MODELS["S"])
    code, output = invoke("--checkpoint", ckpt)
    assert_clean_error(code, output, "--checkpoint needs --config")


def test_export_of_a_checkpoint_writes_artifacts_and_report(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "S.safetensors", "S", *MODELS["S"], round_=4)
    out = tmp_path / "out"

    code, output = invoke(
        "--checkpoint",
        ckpt,
        "--config",
        str(DIGITS_YAML),
        "--formats",
        "onnx",
        "--quantize",
        "none,dynamic",
        "--out",
        out,
        "--threads",
        "1",
        "--latency-iters",
        "2",
    )

    assert code == EXIT_OK, output
    assert {p.name for p in out.iterdir()} == {
        "S-round-4-fp32.onnx",
        "S-round-4-fp32.onnx.json",
        "S-round-4-dynamic.onnx",
        "S-round-4-dynamic.onnx.json",
        "report.json",
    }
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["round"] == 4 and report["threads"] == 1
    assert [(r["format"], r["quantization"]) for r in report["rows"]] == [
        ("torch", "none"),
        ("onnx", "none"),
        ("onnx", "dynamic"),
    ]
    assert "onnxruntime" in output and "OK" in output


def make_run(root: Path, rounds: dict[str, list[int]]) -> Path:
    """A run store as the coordinator writes it: config, state, checkpoints per round."""
    run = root / "run"
    run.mkdir()
    shutil.copy(DIGITS_YAML, run / "config.yaml")
    (run / "state.json").write_text(json.dumps({"round": max(max(r) for r in rounds.values())}))
    for proto, proto_rounds in rounds.items():
        builder, args = MODELS[proto]
        for r in proto_rounds:
            write_checkpoint(
                run / "models" / proto / f"round-{r}.safetensors", proto, builder, args, round_=r
            )
    return run


@pytest.mark.slow
@pytest.mark.skipif(not _LITERT_OK, reason=_LITERT_WHY)
def test_run_mode_exports_what_each_profile_asks_for(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"S": [1, 2], "M": [2], "L": [1, 2]})

    code, output = invoke("--run", run, "--threads", "1", "--latency-iters", "2")

    assert code == EXIT_OK, output
    exports = run / "exports"
    # S (android-phone) and M (raspberry-pi-5) ask for int8 TFLite, L (workstation) float ONNX.
    for proto in ("S", "M"):
        names = {p.name for p in (exports / proto).iterdir()}
        assert {f"{proto}-round-2-fp32.tflite", f"{proto}-round-2-int8.tflite"} <= names
        assert not any(n.endswith(".onnx") for n in names)
    assert {p.name for p in (exports / "L").glob("*.onnx")} == {"L-round-2-fp32.onnx"}
    summary = json.loads((exports / "report.json").read_text())
    assert summary["ok"] and summary["errors"] == {} and summary["state_round"] == 2
    assert [p["prototype"] for p in summary["prototypes"]] == ["S", "M", "L"]


def test_run_mode_records_a_broken_prototype_and_exports_the_rest(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"L": [3]})
    broken = run / "models" / "M" / "round-3.safetensors"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"garbage")

    result = export_run(run, threads=1, latency_iters=2, prototypes=["M", "L"])

    assert list(result.errors) == ["M"] and "not a readable" in result.errors["M"]
    assert [r.prototype for r in result.reports] == ["L"] and result.reports[0].ok
    assert not result.ok
    assert latest_checkpoint(run, "L").name == "round-3.safetensors"


def test_run_mode_without_a_run_directory_is_a_clean_error(tmp_path: Path) -> None:
    code, output = invoke("--run", tmp_path)
    assert_clean_error(code, output, "is not a run directory", "config.yaml")


def test_sign_with_signs_every_sidecar_for_the_fleets_root(tmp_path: Path) -> None:
    from export.metadata import verify_sidecar
    from takfl.release.keys import generate_release_key, load_root

    key, root = generate_release_key(tmp_path / "fleet")
    ckpt = write_checkpoint(tmp_path / "S.safetensors", "S", *MODELS["S"], round_=4)
    common = ("--config", str(DIGITS_YAML), "--formats", "onnx", "--latency-iters", "1")

    code, output = invoke(
        "--checkpoint", ckpt, *common, "--out", tmp_path / "signed", "--sign-with", key
    )
    assert code == EXIT_OK, output
    assert "signed 1 sidecar(s)" in output
    model = tmp_path / "signed" / "S-round-4-fp32.onnx"
    assert verify_sidecar(model, load_root(root)).prototype == "S"

    code, output = invoke("--checkpoint", ckpt, *common, "--out", tmp_path / "plain")
    assert code == EXIT_OK, output
    assert "sidecars not signed" in output
    with pytest.raises(ArtifactError, match="carries no signature"):
        verify_sidecar(tmp_path / "plain" / "S-round-4-fp32.onnx", load_root(root))

    code, output = invoke("--checkpoint", ckpt, *common, "--sign-with", tmp_path / "no-key.pem")
    assert_clean_error(code, output, "no-key.pem")
