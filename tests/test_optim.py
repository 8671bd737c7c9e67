"""The local optimisers give torch.optim's bits, and local training no longer imports the
compiler stack that torch.optim pulls in (memory an edge agent would pay for nothing)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from takfl.optim import SGD_MOMENTUM, LocalOptimizer


def twin_models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3))
    b = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3))
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_steps_equal_torch_optim_bit_for_bit(optimizer: str, weight_decay: float) -> None:
    ours_model, ref_model = twin_models()
    ours = LocalOptimizer(
        ours_model.parameters(), optimizer=optimizer, learning_rate=0.01, weight_decay=weight_decay
    )
    ref: torch.optim.Optimizer = (
        torch.optim.Adam(ref_model.parameters(), lr=0.01, weight_decay=weight_decay)
        if optimizer == "adam"
        else torch.optim.SGD(
            ref_model.parameters(), lr=0.01, momentum=SGD_MOMENTUM, weight_decay=weight_decay
        )
    )
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.randn(8, 1, 8, 8, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if step == 2:  # a parameter without a gradient this step is left alone
                model[3].bias.grad = None
            opt.step()
        for (name, p), q in zip(ours_model.named_parameters(), ref_model.parameters(), strict=True):
            assert torch.equal(p, q), f"{optimizer} step {step}: {name}"


def test_unknown_optimiser_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown optimiser"):
        LocalOptimizer(nn.Linear(2, 2).parameters(), optimizer="lamb", learning_rate=0.1)


@pytest.mark.slow
def test_local_training_leaves_the_compiler_stack_unimported() -> None:
    """In a fresh process: train_local runs both optimisers, and neither torch._dynamo nor
    torch._inductor is imported (torch.optim imports both on its first step)."""
    code = """
import sys, torch
from takfl.config.profile import TrainingSpec
from takfl.training import train_local
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
for opt in ("adam", "sgd"):
    train_local(model, x, y, TrainingSpec(optimizer=opt, epochs=1, batch_size=8), seed=0)
print(sorted(m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules))
torch.optim.SGD(model.parameters(), lr=0.1).step()  # the control: torch.optim does import it
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout + out.stderr
