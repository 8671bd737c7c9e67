"""ExecuTorch programs for phones: training and inference parity with torch on real
digits, the phone profile's rules, and the message when the extra is missing."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

from takfl.config import ConfigError, load_profile
from takfl.config.profile import TrainingSpec
from takfl.data import load_digits
from takfl.models import build_model
from takfl.ondevice import ExecuTorchMissing, ProgramError, require_executorch, train_program
from takfl.training import train_local

HAVE_EXECUTORCH = importlib.util.find_spec("executorch") is not None
needs_executorch = pytest.mark.skipif(
    not HAVE_EXECUTORCH,
    reason="executorch is not installed (pip install 'takfl-edge[executorch]'); CI installs it",
)
SPEC = TrainingSpec(epochs=2, batch_size=8, optimizer="sgd", learning_rate=0.05)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x, y = data.x, data.y
    return x[:96].float(), y[:96].long()


@pytest.fixture(scope="module")
def mlp_program() -> tuple[nn.Module, bytes]:
    from export.executorch_export import training_program

    torch.manual_seed(0)
    model = build_model("mlp_digits", 10, (1, 8, 8), width=16)
    return model, training_program(model, (1, 8, 8), SPEC.batch_size)


@needs_executorch
def test_training_program_trains_like_torch_on_digits(mlp_program, digits) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    model, program = mlp_program
    x, y = digits
    start = {k: v.clone() for k, v in model.state_dict().items()}
    # Execute: 2 epochs of 12 batches, through the runtime and in torch
    runtime = train_program(program, start, x, y, SPEC, seed=3)
    ref = build_model("mlp_digits", 10, (1, 8, 8), width=16)
    ref.load_state_dict(start)
    torch_run = train_local(ref, x, y, SPEC, seed=3)
    # Assert: same steps, same weights (up to float rounding), and it did learn
    assert runtime.steps == torch_run.steps == 24
    for name, value in torch_run.state.items():
        assert torch.allclose(runtime.state[name], value, atol=1e-5), name
    assert any(not torch.equal(runtime.state[k], start[k]) for k in start)
    assert runtime.mean_loss == pytest.approx(torch_run.mean_loss, abs=1e-4)


@needs_executorch
def test_program_runs_a_smaller_last_batch_and_leaves_the_start_weights_alone(
    mlp_program,  # type: ignore[no-untyped-def]
    digits,
) -> None:
    model, program = mlp_program
    x, y = digits
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_program(program, start, x[:13], y[:13], SPEC, seed=0)  # batches 8 + 5
    assert result.steps == 4
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())


@needs_executorch
def test_program_refuses_adam_and_a_model_of_other_shapes(mlp_program, digits) -> None:  # type: ignore[no-untyped-def]
    model, program = mlp_program
    x, y = digits
    with pytest.raises(ProgramError, match="SGD only"):
        train_program(
            program, model.state_dict(), x, y, SPEC.model_copy(update={"optimizer": "adam"}), seed=0
        )
    other = build_model("mlp_digits", 10, (1, 8, 8), width=8).state_dict()
    with pytest.raises(ProgramError, match="shape"):
        train_program(program, other, x, y, SPEC, seed=0)


@pytest.mark.slow
@needs_executorch
def test_inference_program_matches_torch(digits) -> None:  # type: ignore[no-untyped-def]
    from export.executorch_export import inference_parity, inference_program

    torch.manual_seed(0)
    model = build_model("mlp_digits", 10, (1, 8, 8), width=16)
    assert inference_parity(model, inference_program(model, (1, 8, 8)), digits[0][:20]) <= 1e-4


@needs_executorch
def test_batchnorm_model_is_refused_with_the_reason() -> None:
    from export.executorch_export import ProgramExportError, training_program

    model = build_model("cnn_digits_small", 10, (1, 8, 8))
    with pytest.raises(ProgramExportError, match="BatchNorm"):
        training_program(model, (1, 8, 8), 8)


@needs_executorch
def test_maxpool_model_fails_the_parity_check() -> None:
    from export.executorch_export import ProgramParityError, checked_training_program

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 10)
    )
    with pytest.raises(ProgramParityError, match="from torch"):
        checked_training_program(model, (1, 8, 8), SPEC)


def test_two_pass_group_norm_computes_group_norm_and_keeps_the_state_dict() -> None:
    from export.executorch_export import TwoPassGroupNorm, stable_group_norm

    # Prepare
    torch.manual_seed(0)
    model = build_model("mobilenetv2", 10, (3, 16, 16), width_mult=0.5, norm="group")
    swapped = stable_group_norm(copy.deepcopy(model))
    x = torch.randn(4, 3, 16, 16) * 3 + 5
    y = torch.tensor([0, 1, 2, 3])
    # Execute
    out, out_swapped = model(x), swapped(x)
    nn.functional.cross_entropy(out, y).backward()
    nn.functional.cross_entropy(out_swapped, y).backward()
    # Assert
    assert not any(isinstance(m, nn.GroupNorm) for m in swapped.modules())
    assert any(isinstance(m, TwoPassGroupNorm) for m in swapped.modules())
    assert list(swapped.state_dict()) == list(model.state_dict())
    assert torch.allclose(out, out_swapped, atol=1e-5)
    for (name, p), (_, q) in zip(model.named_parameters(), swapped.named_parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name  # type: ignore[arg-type]


@needs_executorch
def test_group_norm_program_stays_exact_on_inputs_far_from_zero() -> None:
    # The runtime's own GroupNorm kernel is off by 4e-4 at an offset of 10 (one-pass
    # variance; benchmarks/executorch_drift.py); the exported two-pass form stays within
    # float32 rounding of the sums (2e-5 there).
    from executorch.exir import to_edge
    from torch.export import export

    from export.executorch_export import run_inference, stable_group_norm

    # Prepare
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 16)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)) + 10.0
    expected = copy.deepcopy(norm).double()(x.double())
    net = stable_group_norm(nn.Sequential(norm))
    # Execute
    program = bytes(to_edge(export(net, (x,))).to_executorch().buffer)
    out = run_inference(program, x)
    # Assert
    assert float((out.double() - expected).abs().max()) < 1e-4


def test_parity_bound_widens_only_as_far_as_torchs_own_float_noise() -> None:
    from export.executorch_export import FLOAT_NOISE_FACTOR, TrainingParity

    # The GroupNorm MobileNetV2 after 6 steps (3.4e-2 from torch, torch float32 3.1e-2
    # from float64) passes; the MaxPool2d probe (7.4 apart, float noise 4.4e-8) fails.
    deep = TrainingParity(
        steps=6, max_param_diff=3.4e-2, loss_torch=2.3, loss_runtime=2.3, float_noise=3.1e-2
    )
    wrong = TrainingParity(
        steps=6, max_param_diff=7.4, loss_torch=2.3, loss_runtime=9.0, float_noise=4.4e-8
    )
    exact_but_noisy = TrainingParity(
        steps=6, max_param_diff=2e-4, loss_torch=2.3, loss_runtime=2.3, float_noise=1e-5
    )
    assert deep.agrees(1e-4) and deep.bound(1e-4) == pytest.approx(FLOAT_NOISE_FACTOR * 3.1e-2)
    assert not wrong.agrees(1e-4) and wrong.bound(1e-4) == 1e-4
    assert not exact_but_noisy.agrees(1e-4)  # 2e-4 is over both 1e-4 and 4 x 1e-5


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "executorch.extension.training", None)
    with pytest.raises(ExecuTorchMissing, match=r"takfl-edge\[executorch\]"):
        require_executorch()


def test_phone_profile_trains_a_groupnorm_model_through_executorch() -> None:
    phone = load_profile("android-phone")
    assert phone.training.backend == "executorch" and phone.training.optimizer == "sgd"
    model = build_model(phone.model.builder, 10, (3, 32, 32), **phone.model.args)
    kinds = {type(m) for m in model.modules()}
    assert nn.GroupNorm in kinds
    assert not kinds & {nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d}


def test_executorch_backend_requires_sgd(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "p.yaml"
    bad.write_text(
        "name: p\nprototype: S\nhardware_class: phone\n"
        "model: {builder: mlp_digits}\ntraining: {backend: executorch, optimizer: adam}\n"
    )
    with pytest.raises(ConfigError, match="optimizer: sgd"):
        load_profile(bad)


@pytest.mark.slow
@needs_executorch
@pytest.mark.export
def test_takfl_export_writes_checked_programs_with_metadata(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.test_export_cli import DIGITS_YAML, MODELS, invoke, write_checkpoint

    # Prepare: a round-4 checkpoint of S (an MLP) and one of M (BatchNorm + max-pool)
    s_ckpt = write_checkpoint(tmp_path / "S.safetensors", "S", *MODELS["S"], round_=4)
    m_ckpt = write_checkpoint(tmp_path / "M.safetensors", "M", *MODELS["M"])
    # Execute
    code, output = invoke(
        "--checkpoint", s_ckpt, "--config", DIGITS_YAML, "--executorch", "--out", tmp_path / "S"
    )
    # Assert: both programs, each with its metadata and digest
    assert code == 0, output
    train = json.loads((tmp_path / "S" / "S-round-4-train.pte.json").read_text())
    infer = json.loads((tmp_path / "S" / "S-round-4-xnnpack.pte.json").read_text())
    for side in (train, infer):
        assert side["prototype"] == "S" and side["round"] == 4
        assert side["input_shape"] == [1, 8, 8] and len(side["mean"]) == 1
        assert len(side["sha256"]) == 64 and side["size_bytes"] > 0
        assert side["parameters"]["net.1.weight"] == [8, 64]
    assert train["format"] == "executorch-training" and train["parity"]["max_param_diff"] <= 1e-4
    assert infer["delegate"] == "xnnpack" and infer["parity"]["max_abs_logit_diff"] <= 1e-4
    code, output = invoke(
        "--checkpoint", m_ckpt, "--config", DIGITS_YAML, "--executorch", "--out", tmp_path / "M"
    )
    assert code == 1 and "BatchNorm" in output and "Traceback" not in output
