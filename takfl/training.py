"""The local training step: the one function both virtual clients and edge agents run."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from takfl.config.profile import TrainingSpec
from takfl.optim import LocalOptimizer
from takfl.state import State


@dataclass(kw_only=True)
class LocalResult:
    state: State  # trained weights, every state-dict entry, on CPU
    num_samples: int
    mean_loss: float
    steps: int
    seconds: float
    stopped_early: bool  # the time budget ran out before all epochs finished


def make_optimizer(model: nn.Module, spec: TrainingSpec) -> LocalOptimizer:
    """The profile's optimiser (Adam, or SGD with momentum) for local training, without
    ``torch.optim`` and the compiler stack it imports (:mod:`takfl.optim`)."""
    return LocalOptimizer(
        model.parameters(),
        optimizer=spec.optimizer,
        learning_rate=spec.learning_rate,
        weight_decay=spec.weight_decay,
    )


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: TrainingSpec,
    *,
    seed: int,
    device: torch.device | str = "cpu",
) -> LocalResult:
    """Train ``model`` in place on (x, y) with cross-entropy for ``spec.epochs`` epochs.

    Args:
        model: initialised with the round's global weights.
        x: (N, C, H, W) float images; y: (N,) int64 labels.
        spec: epochs, batch size, optimiser, learning rate, weight decay, time budget.
        seed: makes shuffling reproducible (the same seed gives the same weights on CPU).
    Returns:
        the trained state dict (detached CPU copies) and statistics.
    """
    if len(x) == 0:
        raise ValueError("cannot train on an empty data set")
    dev = torch.device(device)
    model.to(dev).train()
    opt = make_optimizer(model, spec)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    start = time.monotonic()
    total, steps, stopped = 0.0, 0, False
    xs, ys = x.to(dev), y.to(dev)
    for _ in range(spec.epochs):
        order = torch.randperm(len(xs), generator=gen).to(dev)
        for i in range(0, len(order), spec.batch_size):
            idx = order[i : i + spec.batch_size]
            if len(idx) < 2 and len(order) >= 2:
                continue  # BatchNorm cannot train on one sample
            opt.zero_grad()
            loss = loss_fn(model(xs[idx]), ys[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
            if spec.time_budget_s is not None and time.monotonic() - start > spec.time_budget_s:
                stopped = True
                break
        if stopped:
            break
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    return LocalResult(
        state=state,
        num_samples=len(x),
        mean_loss=total / max(steps, 1),
        steps=steps,
        seconds=time.monotonic() - start,
        stopped_early=stopped,
    )


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits (N, classes) of ``model`` in eval mode on x (N, C, H, W), on x's device."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    if len(x) == 0:
        return float("nan")
    return float((predict_logits(model, x).argmax(1) == y).float().mean()) * 100.0
