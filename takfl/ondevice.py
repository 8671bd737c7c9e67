"""Local training through an ExecuTorch training program (the phone tier's engine).

A training program (built by ``export.executorch_export``) holds one method,
``forward``: (x (B, C, H, W) float32, y (B,) int64) -> cross-entropy loss, with its
gradients. Its parameters are named ``model.<state-dict name>``. This module loads
such a program from bytes, writes the round's global weights into it, and runs the
same epochs, batches and SGD steps as :func:`takfl.training.train_local` (same
shuffling for the same seed), so the two agree up to the runtime's float kernels.

ExecuTorch is an optional extra (``pip install 'takfl-edge[executorch]'``); its
Python runtime links libtorch. On a phone the same program runs in ExecuTorch's
Android or iOS runtime.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

import torch

from takfl.config.profile import TrainingSpec
from takfl.optim import SGD_MOMENTUM
from takfl.state import State, StateView
from takfl.training import LocalResult

PARAM_PREFIX = "model."  # parameter names in a training program: PARAM_PREFIX + state-dict name
METHOD = "forward"  # the program's joint forward-backward method
EXTRA = "executorch"  # the pyproject extra that installs the runtime


class ExecuTorchMissing(ImportError):
    """The ExecuTorch runtime is not installed; the message says how to install it."""


class ProgramError(ValueError):
    """A training program does not fit the model or the training settings."""


def require_executorch(what: str = "training through ExecuTorch") -> Any:
    """The ``executorch.extension.training`` module, or :class:`ExecuTorchMissing`."""
    try:
        return importlib.import_module("executorch.extension.training")
    except ImportError as e:
        raise ExecuTorchMissing(
            f"{what} needs ExecuTorch: pip install 'takfl-edge[{EXTRA}]' "
            f"(or pip install -c constraints.txt executorch)"
        ) from e


def load_program(program: bytes) -> Any:
    """A runtime training module for ``program`` (ExecuTorch ``.pte`` bytes)."""
    training = require_executorch()
    return training._load_for_executorch_for_training_from_buffer(program)


def program_parameters(module: Any, probe: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """The program's parameters by state-dict name (they alias the program's memory).

    The runtime exposes them only after one ``forward_backward``; ``probe`` is the batch
    used for that call (no step is taken)."""
    module.forward_backward(METHOD, probe)
    return program_parameters_now(module)


def load_weights(params: StateView, state: StateView) -> None:
    """Copy every parameter of ``state`` into the program's ``params``; a name or shape
    the program lacks is a :class:`ProgramError`."""
    missing = sorted(set(params) - set(state))
    if missing:
        raise ProgramError(f"the global model lacks program parameters {missing[:5]}")
    for name, dst in params.items():
        src = state[name]
        if tuple(src.shape) != tuple(dst.shape):
            raise ProgramError(
                f"{name}: program has shape {tuple(dst.shape)}, model {tuple(src.shape)}"
            )
        dst.copy_(src.detach().to(dst.dtype))


def train_program(
    program: bytes,
    global_state: StateView,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: TrainingSpec,
    *,
    seed: int,
) -> LocalResult:
    """Train through the ExecuTorch runtime from ``global_state`` on (x, y).

    Args:
        program: training program bytes (see the module docstring).
        global_state: the round's global state dict; entries that are not program
            parameters (buffers) are returned unchanged.
        x: (N, C, H, W) float32 images; y: (N,) int64 labels.
        spec: epochs, batch size, learning rate, weight decay, time budget; the optimiser
            must be ``sgd`` (the runtime's optimiser; momentum as in ``train_local``).
        seed: shuffling seed, as in :func:`takfl.training.train_local`.
    Returns:
        the trained state dict (CPU copies) and statistics.
    """
    if spec.optimizer != "sgd":
        raise ProgramError(
            f"the ExecuTorch runtime trains with SGD only; the task asks for {spec.optimizer!r}"
        )
    if len(x) == 0:
        raise ValueError("cannot train on an empty data set")
    training = require_executorch()
    module = load_program(program)
    xs, ys = x.float().contiguous(), y.long().contiguous()
    params = program_parameters(module, (xs[:2], ys[:2]))
    load_weights(params, global_state)
    opt = training.get_sgd_optimizer(
        module.named_parameters(), spec.learning_rate, SGD_MOMENTUM, 0.0, spec.weight_decay, False
    )
    gen = torch.Generator().manual_seed(seed)
    start = time.monotonic()
    total, steps, stopped = 0.0, 0, False
    for _ in range(spec.epochs):
        order = torch.randperm(len(xs), generator=gen)
        for i in range(0, len(order), spec.batch_size):
            idx = order[i : i + spec.batch_size]
            if len(idx) < 2 and len(order) >= 2:
                continue  # as train_local: no one-sample batches
            loss = module.forward_backward(METHOD, (xs[idx].contiguous(), ys[idx].contiguous()))
            opt.step(module.named_gradients())
            total += float(loss[0])
            steps += 1
            if spec.time_budget_s is not None and time.monotonic() - start > spec.time_budget_s:
                stopped = True
                break
        if stopped:
            break
    trained = program_parameters_now(module)
    state = {k: trained[k].clone() if k in trained else v.clone() for k, v in global_state.items()}
    return LocalResult(
        state=state,
        num_samples=len(x),
        mean_loss=total / max(steps, 1),
        steps=steps,
        seconds=time.monotonic() - start,
        stopped_early=stopped,
    )


def program_parameters_now(module: Any) -> State:
    """The program's current parameters by state-dict name (after at least one call)."""
    return {k.removeprefix(PARAM_PREFIX): v for k, v in module.named_parameters().items()}
