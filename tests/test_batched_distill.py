"""Batched (vmapped) distillation equals the sequential one; the server step's two
paths agree; the fallback for models vmap cannot run; bf16 autocast numerics."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
from torch import nn

from takfl.algorithms import resolve_algorithm
from takfl.config import AlgorithmSpec
from takfl.distill import (
    DistillSettings,
    distill,
    takfl_objective,
    takfl_objective_stacked,
)
from takfl.distill_batched import (
    CPU_BATCHED_MAX_FLOPS,
    batched_pays,
    distill_batched,
    forward_flops_per_sample,
    vmap_unsupported,
)
from takfl.models import build_model
from takfl.server import PrototypeInput, StepData, server_step, takfl_step
from takfl.task_arithmetic import task_vector
from takfl.training import predict_logits

SHAPE = (1, 8, 8)
N, K = 40, 10
TOL = {"rtol": 1e-4, "atol": 1e-5}


def student(builder: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    args = {"width": 8} if builder == "mlp_digits" else {}
    model = build_model(builder, K, SHAPE, **args)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def teachers(m: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(N, K, generator=g) * 3 for _ in range(m)]


def public() -> torch.Tensor:
    return torch.randn(N, *SHAPE, generator=torch.Generator().manual_seed(2))


def sequential(model, start, x, targets, self_logits, settings, gamma=0.5):  # type: ignore[no-untyped-def]
    return [
        distill(
            model, start, x, takfl_objective(z, self_logits, 3.0, gamma, 20.0), settings, seed=7
        )
        for z in targets
    ]


def batched(model, start, x, targets, self_logits, settings, gamma=0.5):  # type: ignore[no-untyped-def]
    objective = takfl_objective_stacked(torch.stack(targets), self_logits, 3.0, gamma, 20.0)
    return distill_batched(model, start, x, objective, len(targets), settings, seed=7)


def assert_states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], **TOL, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def test_stacked_objective_is_the_sum_of_the_per_teacher_objectives() -> None:
    targets = teachers()
    self_logits = torch.randn(N, K)
    idx = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    s = torch.randn(3, len(idx), K)
    stacked = takfl_objective_stacked(torch.stack(targets), self_logits, 3.0, 0.5, 20.0)(s, idx)
    one_by_one = sum(
        takfl_objective(z, self_logits, 3.0, 0.5, 20.0)(s[k], idx) for k, z in enumerate(targets)
    )
    torch.testing.assert_close(stacked, one_by_one)


@pytest.mark.parametrize("builder", ["mlp_digits", "cnn_digits_small"])
@pytest.mark.parametrize(
    "settings",
    [
        DistillSettings(steps=6, batch_size=8, learning_rate=1e-2),
        DistillSettings(epochs=2, batch_size=16, learning_rate=1e-2, weight_decay=5e-2),
    ],
    ids=["steps", "epochs+weight-decay"],
)
def test_batched_equals_sequential(builder: str, settings: DistillSettings) -> None:
    model, start = student(builder)
    x = public()
    self_logits = predict_logits(model, x).detach()
    targets = teachers()
    seq = sequential(model, start, x, targets, self_logits, settings)
    bat = batched(model, start, x, targets, self_logits, settings)
    assert len(bat) == len(seq) == 3
    for s, b in zip(seq, bat, strict=True):
        assert_states_close(s, b)
    # every copy moved from the start, and to a different place per teacher
    for a in bat:
        assert any(not torch.equal(a[k], start[k]) for k in start if a[k].is_floating_point())
    key = next(k for k, v in start.items() if v.is_floating_point())
    assert not torch.allclose(bat[0][key], bat[1][key])
    if builder == "cnn_digits_small":  # BatchNorm running statistics, per copy
        assert int(bat[0]["features.1.num_batches_tracked"]) == settings.total_steps(N)
        assert not torch.equal(bat[0]["features.1.running_mean"], start["features.1.running_mean"])
    for k, v in start.items():  # the start is never modified
        assert torch.equal(v, student(builder)[1][k])


class ItemGate(nn.Module):
    """A forward that branches on a tensor's value, which vmap cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.flatten(1))
        if out.sum().item() > 1e9:
            out = out * 0
        return out


def tiny_round(models: list[nn.Module]) -> tuple[list[PrototypeInput], StepData]:
    protos = []
    for i, (model, z) in enumerate(zip(models, teachers(len(models)), strict=True)):
        protos.append(
            PrototypeInput(
                name="SML"[i],
                model=model,
                avg_state={k: v.clone() for k, v in model.state_dict().items()},
                mean_logits=z,
                num_clients=2,
            )
        )
    g = torch.Generator().manual_seed(3)
    data = StepData(
        public(), torch.randn(16, *SHAPE, generator=g), torch.randint(0, K, (16,), generator=g)
    )
    return protos, data


def spec(**distill: object) -> AlgorithmSpec:
    d = {"epochs": 2, "batch_size": 16, "learning_rate": 1e-2, "weight_decay": 1e-2}
    d.update(distill)
    return AlgorithmSpec.model_validate(
        {"distill": d, "lambdas": {"search_candidates": 6, "candidates_per_exponent": 2}}
    )


def zoo_models() -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        build_model("mlp_digits", K, SHAPE, width=8),
        build_model("cnn_digits_small", K, SHAPE),
        build_model("mlp_digits", K, SHAPE, width=16),
    ]


@pytest.mark.parametrize("name", ["takfl", "takfl-reg", "takfl-scaled"])
def test_server_step_paths_agree(name: str) -> None:
    """Merged states and lambdas of the batched and the sequential server step agree."""
    outs: dict[bool | str, dict] = {}
    for flag in (True, False, "auto"):
        protos, data = tiny_round(zoo_models())
        algo = resolve_algorithm(spec(batched=flag), name, lambda_strategy="search")
        outs[flag], _ = server_step(protos, data, algo, seed=5)
    for p in "SML":
        assert_states_close(outs[True][p].state, outs[False][p].state)
        assert_states_close(outs["auto"][p].state, outs[False][p].state)
        lam_b, lam_s = outs[True][p].lambdas, outs[False][p].lambdas
        assert lam_b is not None and lam_s is not None and lam_b.keys() == lam_s.keys()
        for t in lam_b:
            assert lam_b[t] == pytest.approx(lam_s[t], abs=1e-6)
        assert outs[True][p].info.keys() == outs[False][p].info.keys()


def test_a_model_vmap_cannot_run_falls_back_to_sequential(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    gate = ItemGate()
    reason = vmap_unsupported(gate, public())
    assert reason is not None and "item" in reason.lower()
    assert vmap_unsupported(build_model("cnn_digits_small", K, SHAPE), public()) is None

    def models() -> list[nn.Module]:
        ms = zoo_models()
        torch.manual_seed(0)
        ms[0] = ItemGate()
        return ms

    outs = {}
    for flag in (True, False):
        protos, data = tiny_round(models())
        algo = resolve_algorithm(spec(), "takfl-reg", lambda_strategy="search")
        with caplog.at_level(logging.WARNING, logger="takfl.server"):
            outs[flag] = takfl_step(
                protos, data, algo, 5, {}, self_reg=True, scaled=False, batched=flag
            )
    warned = [r.getMessage() for r in caplog.records if "cannot be vmapped" in r.getMessage()]
    assert len(warned) == 1 and "prototype S (ItemGate)" in warned[0]
    for p in "SML":
        assert_states_close(outs[True][p].state, outs[False][p].state)


def relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a if a[k].is_floating_point())
    den = sum(float(b[k].pow(2).sum()) for k in b if b[k].is_floating_point())
    return (num / den) ** 0.5


# Relative L2 error of the distilled task vector, bf16 autocast against fp32, after 6
# Adam steps at lr 1e-3 (the digits setting); measured up to 0.016 on the development
# machine. At lr 1e-2 the two trajectories part (Adam normalises the step, so bf16
# rounding in near-zero gradients flips update signs), which no fixed bound describes.
BF16_TOLERANCE = 0.05


def bf16_against_fp32(device: torch.device) -> list[float]:
    model, start = student("cnn_digits_small")
    model = model.to(device)
    x = public().to(device)
    targets = [z.to(device) for z in teachers()]
    self_logits = predict_logits(model, x).detach()
    errors = []
    for run in (batched, sequential):
        fp32 = DistillSettings(epochs=2, batch_size=16, learning_rate=1e-3, weight_decay=1e-3)
        bf16 = DistillSettings(
            epochs=2, batch_size=16, learning_rate=1e-3, weight_decay=1e-3, precision="bf16"
        )
        ref = run(model, start, x, targets, self_logits, fp32)
        low = run(model, start, x, targets, self_logits, bf16)
        for r, lo in zip(ref, low, strict=True):
            tau_r, tau_lo = task_vector(r, start), task_vector(lo, start)
            errors.append(relative_error(tau_lo, tau_r))
    return errors


def test_bf16_autocast_is_close_to_fp32_on_cpu() -> None:
    """The bf16 path runs here (CPU autocast) and stays within BF16_TOLERANCE of fp32; it
    is not bitwise fp32 (the autocast is in effect)."""
    errors = bf16_against_fp32(torch.device("cpu"))
    assert max(errors) < BF16_TOLERANCE
    assert min(errors) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; the CPU test covers bf16")
def test_bf16_autocast_is_close_to_fp32_on_cuda() -> None:
    errors = bf16_against_fp32(torch.device("cuda"))
    assert max(errors) < BF16_TOLERANCE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; CPU tests cover the paths")
def test_batched_equals_sequential_on_cuda() -> None:
    model, start = student("cnn_digits_small")
    model = model.cuda()
    x = public().cuda()
    targets = [z.cuda() for z in teachers()]
    self_logits = predict_logits(model, x).detach()
    settings = DistillSettings(epochs=2, batch_size=16, learning_rate=1e-2, weight_decay=1e-3)
    seq = sequential(model, start, x, targets, self_logits, settings)
    bat = batched(model, start, x, targets, self_logits, settings)
    for s, b in zip(seq, bat, strict=True):
        assert_states_close(s, b)


def test_auto_batches_the_cheap_digits_students_on_cpu() -> None:
    """``batched: auto`` on CPU: the MLP and small CNN distil batched, the large CNN
    (over CPU_BATCHED_MAX_FLOPS per sample) sequentially."""
    x = public()
    torch.manual_seed(0)
    assert batched_pays(build_model("mlp_digits", K, SHAPE, width=8), x)
    assert batched_pays(build_model("cnn_digits_small", K, SHAPE), x)
    large = build_model("cnn_digits_large", K, SHAPE)
    assert forward_flops_per_sample(large, x) > CPU_BATCHED_MAX_FLOPS
    assert not batched_pays(large, x)


def test_the_spec_takes_true_false_and_auto() -> None:
    assert spec().distill.batched == "auto"
    assert spec(batched=True).distill.batched is True
    assert spec(batched=False).distill.batched is False
    with pytest.raises(ValueError):
        spec(batched="sometimes")
    with pytest.raises(ValueError):
        spec(precision="fp8")


@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None,
    reason="torch.compile's CPU backend needs a C++ compiler (apt-get install g++); "
    "the uncompiled paths are covered above",
)
@pytest.mark.slow
def test_compiled_distillation_equals_eager_on_cpu() -> None:
    """``distill.compile``: both paths, compiled with torch.compile, give the eager result."""
    model, start = student("mlp_digits")
    x = public()
    self_logits = predict_logits(model, x).detach()
    targets = teachers(2)
    eager = DistillSettings(steps=4, batch_size=8, learning_rate=1e-2)
    compiled = DistillSettings(steps=4, batch_size=8, learning_rate=1e-2, compile=True)
    for run in (sequential, batched):
        torch._dynamo.reset()
        ref = run(model, start, x, targets, self_logits, eager)
        got = run(model, start, x, targets, self_logits, compiled)
        for r, g in zip(ref, got, strict=True):
            assert_states_close(r, g)
