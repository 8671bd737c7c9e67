"""ExecuTorch programs for phones: a training program (forward, loss, backward) and an
inference program (XNNPACK delegate), each verified against PyTorch.

Training program: ``torch.export`` of the model wrapped with its cross-entropy loss,
``_export_forward_backward`` (the joint graph with gradients), ``to_edge`` and
``to_executorch``; batch size symbolic. It trains with ExecuTorch's SGD optimiser
(:mod:`takfl.ondevice`). Inference program: the model in eval mode lowered to
XNNPACK. Both are checked before use, because a wrong backward kernel fails silently
(MaxPool2d trains wrongly in ExecuTorch 1.5.1; training-mode BatchNorm does not lower).

This module lowers models and measures parity; writing, stamping and reporting the
programs is the business of their format units (:mod:`export.formats.executorch`,
:mod:`export.formats.executorch_training`), like every other format's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from takfl.config.profile import TrainingSpec
from takfl.ondevice import METHOD, require_executorch, train_program
from takfl.training import train_local

# The runtime plans memory for the largest batch a program accepts, so keep it small.
INFERENCE_MAX_BATCH = 64
INFERENCE_PARITY_TOLERANCE = 1e-4  # max |logit difference| of the inference program


class ProgramExportError(ValueError):
    """A model cannot be lowered to an ExecuTorch program; the message says why."""


def _lowering_reason(e: BaseException) -> str:
    text = str(e)
    if "batch_norm" in text:
        return "BatchNorm in training mode does not lower (no edge-dialect kernel)"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}"[:200]


class TwoPassGroupNorm(nn.Module):
    """``nn.GroupNorm`` written with plain tensor ops, its variance the mean of squared
    deviations from the group mean (two passes): (B, C, *) -> (B, C, *).

    ExecuTorch 1.5.1's portable ``native_group_norm`` kernel computes the variance in one
    pass (mean of squares minus squared mean), which cancels catastrophically when a
    group's mean is large against its spread: on inputs offset by 10 its float32 output
    is off by 4e-4 (torch: 2e-6), at an offset of 1000 it returns NaN. Exported programs
    use this module in place of every GroupNorm; it shares the GroupNorm's parameters,
    so the names and shapes of the program's parameters do not change.
    """

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.num_groups, self.eps = norm.num_groups, norm.eps
        self.weight, self.bias = norm.weight, norm.bias  # None when not affine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.reshape(x.shape[0], self.num_groups, -1)
        centred = groups - groups.mean(dim=2, keepdim=True)
        var = (centred * centred).mean(dim=2, keepdim=True)
        out = (centred * torch.rsqrt(var + self.eps)).reshape(x.shape)
        per_channel = (1, -1) + (1,) * (x.dim() - 2)
        if self.weight is not None:
            out = out * self.weight.reshape(per_channel)
        if self.bias is not None:
            out = out + self.bias.reshape(per_channel)
        return out


def stable_group_norm(model: nn.Module) -> nn.Module:
    """``model`` (changed in place) with every ``nn.GroupNorm`` replaced by a
    :class:`TwoPassGroupNorm` sharing its parameters; the state dict is unchanged."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, TwoPassGroupNorm(child))
    return model


class WithLoss(nn.Module):
    """``model`` and its training loss: (x (B, C, H, W), y (B,)) -> mean cross-entropy."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model  # parameter names: "model." + state-dict name (takfl.ondevice)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(self.model(x), y)


def _quiet_export() -> None:
    require_executorch("exporting an ExecuTorch program")


def training_program(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    max_batch: int,
    *,
    two_pass_group_norm: bool = True,
) -> bytes:
    """Training program bytes of ``model`` for batches of 1..``max_batch`` samples (its
    current weights are the program's initial ones; an agent overwrites them with each
    round's global weights). GroupNorm layers are exported as :class:`TwoPassGroupNorm`
    unless ``two_pass_group_norm`` is False (the runtime's own kernel; for measuring)."""
    _quiet_export()
    from executorch.exir import to_edge
    from torch.export import Dim, export
    from torch.export.experimental import _export_forward_backward

    net = copy.deepcopy(model)
    wrapped = WithLoss(stable_group_norm(net) if two_pass_group_norm else net).train()
    x = torch.zeros(2, *input_shape)
    y = torch.zeros(2, dtype=torch.long)
    batch = Dim("batch", min=1, max=max(2, max_batch))
    try:
        ep = export(wrapped, (x, y), dynamic_shapes=({0: batch}, {0: batch}), strict=False)
        return bytes(to_edge(_export_forward_backward(ep)).to_executorch().buffer)
    except Exception as e:  # torch.export and exir raise many unrelated types
        raise ProgramExportError(_lowering_reason(e)) from e


def inference_program(model: nn.Module, input_shape: tuple[int, int, int]) -> bytes:
    """Inference program bytes: (B, C, H, W) float32 -> (B, classes) logits, XNNPACK."""
    _quiet_export()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torch.export import Dim, export

    net = stable_group_norm(copy.deepcopy(model)).eval()
    batch = Dim("batch", min=1, max=INFERENCE_MAX_BATCH)
    ep = export(net, (torch.zeros(2, *input_shape),), dynamic_shapes=({0: batch},), strict=False)
    lowered = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    return bytes(lowered.to_executorch().buffer)


def run_inference(program: bytes, x: torch.Tensor) -> torch.Tensor:
    """Logits of an inference program on x (B, C, H, W) through the ExecuTorch runtime."""
    _quiet_export()
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(program).load_method(METHOD)
    return method.execute([x.float().contiguous()])[0].detach().clone()


def inference_parity(model: nn.Module, program: bytes, x: torch.Tensor) -> float:
    """Max |logit difference| between the inference program and ``model`` on x."""
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x)
    return float((run_inference(program, x) - expected).abs().max())


# A deep network amplifies float32 rounding from step to step (the GroupNorm MobileNetV2:
# torch float32 against float64, or torch with 2 threads against 1, end 3e-2 apart after
# 6 steps; benchmarks/executorch_drift.py). A program passes when it is within
# max(tolerance, FLOAT_NOISE_FACTOR x that float32-vs-float64 distance) of torch; a wrong
# kernel (MaxPool2d: 1.29 apart where float noise is 1e-7) still fails by orders of size.
FLOAT_NOISE_FACTOR = 4.0


@dataclass(frozen=True, kw_only=True)
class TrainingParity:
    steps: int
    max_param_diff: float  # max |runtime - torch| over every parameter after the steps
    loss_torch: float  # mean training loss of the torch run
    loss_runtime: float
    float_noise: float = 0.0  # max |torch float32 - torch float64| after the same steps

    def bound(self, tolerance: float) -> float:
        """The largest ``max_param_diff`` accepted: ``tolerance``, or more where torch's
        own float32 rounding moves the parameters further."""
        return max(tolerance, FLOAT_NOISE_FACTOR * self.float_noise)

    def agrees(self, tolerance: float) -> bool:
        return self.max_param_diff <= self.bound(tolerance)


def training_parity(
    model: nn.Module,
    program: bytes,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: TrainingSpec,
    *,
    seed: int = 0,
) -> TrainingParity:
    """Train the same epochs and batches (same shuffling, same start weights) through the
    runtime, in torch (``train_local``) and in torch float64; compare every parameter
    afterwards (runtime against torch, and torch against its float64 run)."""
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    runtime = train_program(program, start, x, y, spec, seed=seed)
    torch_run = train_local(copy.deepcopy(model), x, y, spec, seed=seed)
    exact = train_local(copy.deepcopy(model).double(), x.double(), y, spec, seed=seed)
    names = [n for n, _ in model.named_parameters()]

    def gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return max(float((a[n].double() - b[n].double()).abs().max()) for n in names)

    return TrainingParity(
        steps=torch_run.steps,
        max_param_diff=gap(runtime.state, torch_run.state),
        loss_torch=torch_run.mean_loss,
        loss_runtime=runtime.mean_loss,
        float_noise=gap(torch_run.state, exact.state),
    )


TRAINING_PARITY_TOLERANCE = 1e-4  # max |parameter difference| after the check's steps
CHECK_SAMPLES = 32  # random samples of the check before a program is used


class ProgramParityError(ValueError):
    """A training program does not train like torch; the message says by how much."""


def checked_training_program(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    spec: TrainingSpec,
    *,
    tolerance: float = TRAINING_PARITY_TOLERANCE,
) -> tuple[bytes, TrainingParity]:
    """A training program for ``model`` and batches of ``spec.batch_size``, after one epoch
    on random data (``CHECK_SAMPLES`` samples) through the runtime agreed with torch within
    ``tolerance`` (or ``FLOAT_NOISE_FACTOR`` x torch's own float32-vs-float64 distance,
    when larger) in every parameter; :class:`ProgramParityError` otherwise."""
    program = training_program(model, input_shape, spec.batch_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(CHECK_SAMPLES, *input_shape, generator=gen)
    with torch.no_grad():
        num_classes = int(copy.deepcopy(model).eval()(x[:2]).shape[1])
    y = torch.randint(0, num_classes, (CHECK_SAMPLES,), generator=gen)
    check = spec.model_copy(update={"epochs": 1, "time_budget_s": None})
    parity = training_parity(model, program, x, y, check)
    if not parity.agrees(tolerance):
        raise ProgramParityError(
            f"the ExecuTorch training program of {type(model).__name__} ends "
            f"{parity.max_param_diff:.2e} from torch after {parity.steps} steps "
            f"(bound {parity.bound(tolerance):.1e}); use layers the runtime trains correctly "
            "(GroupNorm, strided convolutions, adaptive average pooling)"
        )
    return program, parity
