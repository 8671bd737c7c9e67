"""Why the GroupNorm MobileNetV2 drifts from torch through ExecuTorch, measured.

    python benchmarks/executorch_drift.py [--steps 6] [--size 32] [--threads 1]

Two parts:

1. The GroupNorm kernel alone: a GroupNorm(8, 64) on (8, 64, 8, 8) inputs drawn from
   N(offset, 1), through a portable-kernel ExecuTorch program (the runtime's
   ``native_group_norm``) and through the same layer written with plain ops in two passes
   (``export.executorch_export.TwoPassGroupNorm``), each against a float64 reference,
   beside torch's own float32 error.
2. MobileNetV2 x0.5 with GroupNorm (the android-phone model, 3 x size x size, batch 8,
   SGD lr 0.01 momentum 0.9, random data): ``--steps`` steps through the runtime, with
   the runtime's GroupNorm kernel and with the two-pass export, against the same steps in
   torch. After every step: the largest parameter difference to torch float32 (1 thread),
   to torch float64, and, for scale, torch float32 with 2 threads against 1 thread and
   torch float32 against float64, the largest parameter and the largest change of a
   parameter since the start. And the gradient at step 1 (same weights, same batch)
   relative to the largest float64 gradient, for each run.

Prints tables and writes benchmarks/results/executorch_drift.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from export.executorch_export import TwoPassGroupNorm, training_program
from takfl.models import build_model
from takfl.ondevice import (
    METHOD,
    load_program,
    load_weights,
    program_parameters,
    program_parameters_now,
    require_executorch,
)
from takfl.optim import SGD_MOMENTUM

RESULTS = Path(__file__).parent / "results" / "executorch_drift.json"
BATCH, LR = 8, 0.01
OFFSETS = (0.0, 1.0, 10.0, 100.0, 1000.0)

Snapshot = dict[str, torch.Tensor]
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def _forward_program(module: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` (B, C, H, W) -> (B, C, H, W) through a portable-kernel (no delegate)
    ExecuTorch program."""
    from executorch.exir import to_edge
    from executorch.runtime import Runtime
    from torch.export import export

    buffer = bytes(to_edge(export(module, (x,))).to_executorch().buffer)
    program = Runtime.get().load_program(buffer)

    def run(inp: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = program.load_method(METHOD).execute([inp])[0]
        return out.detach().clone()

    return run


def group_norm_errors() -> list[dict[str, float]]:
    """Max |output - float64 reference| of one GroupNorm per input offset: the runtime's
    kernel, the two-pass export and torch float32."""
    torch.manual_seed(0)
    norm = nn.GroupNorm(8, 64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    ref = copy.deepcopy(norm).double()
    shape = (8, 64, 8, 8)
    kernel = _forward_program(norm, torch.zeros(shape))
    two_pass = _forward_program(TwoPassGroupNorm(copy.deepcopy(norm)), torch.zeros(shape))
    rows = []
    for offset in OFFSETS:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) + offset
        with torch.no_grad():
            expected = ref(x.double())
            torch32 = norm(x).double()

        def err(out: torch.Tensor, expected: torch.Tensor = expected) -> float:
            return float((out.double() - expected).abs().max())

        rows.append(
            {
                "offset": offset,
                "runtime_kernel": err(kernel(x)),
                "two_pass_export": err(two_pass(x)),
                "torch_fp32": err(torch32),
            }
        )
    return rows


def runtime_trajectory(program: bytes, start: Snapshot, batches: Batches) -> list[Snapshot]:
    """Parameters after each SGD step through the runtime (float64 copies)."""
    training = require_executorch()
    module = load_program(program)
    load_weights(program_parameters(module, batches[0]), start)
    opt = training.get_sgd_optimizer(module.named_parameters(), LR, SGD_MOMENTUM, 0.0, 0.0, False)
    out = []
    for x, y in batches:
        module.forward_backward(METHOD, (x, y))
        opt.step(module.named_gradients())
        out.append(
            {k: v.detach().double().clone() for k, v in program_parameters_now(module).items()}
        )
    return out


def runtime_gradients(
    program: bytes, start: Snapshot, x: torch.Tensor, y: torch.Tensor
) -> Snapshot:
    module = load_program(program)
    load_weights(program_parameters(module, (x, y)), start)
    module.forward_backward(METHOD, (x, y))
    return {
        k.removeprefix("model."): v.double().clone() for k, v in module.named_gradients().items()
    }


def torch_trajectory(
    model: nn.Module, batches: Batches, dtype: torch.dtype, threads: int
) -> list[Snapshot]:
    """Parameters after each SGD step in torch (float64 copies)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    net = copy.deepcopy(model).to(dtype).train()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=SGD_MOMENTUM)
    out = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x.to(dtype)), y).backward()
        opt.step()
        out.append({n: p.detach().double().clone() for n, p in net.named_parameters()})
    torch.set_num_threads(before)
    return out


def torch_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, threads: int
) -> Snapshot:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    net = copy.deepcopy(model).to(dtype).train()
    nn.functional.cross_entropy(net(x.to(dtype)), y).backward()
    torch.set_num_threads(before)
    return {n: p.grad.double().clone() for n, p in net.named_parameters() if p.grad is not None}


def max_diff(a: Snapshot, b: Snapshot) -> tuple[float, str]:
    """Largest |a - b| over the shared parameters, and the parameter where it is."""
    return max((float((a[n] - b[n]).abs().max()), n) for n in b)


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=160)

    kernel_rows = group_norm_errors()
    table = Table(title="GroupNorm(8, 64) on N(offset, 1): max |output - float64|")
    for col in ("offset", "runtime kernel", "two-pass export", "torch float32"):
        table.add_column(col)
    for r in kernel_rows:
        table.add_row(
            f"{r['offset']:g}",
            *(f"{r[k]:.1e}" for k in ("runtime_kernel", "two_pass_export", "torch_fp32")),
        )
    console.print(table)

    shape = (3, args.size, args.size)
    torch.manual_seed(0)
    model = build_model("mobilenetv2", 10, shape, width_mult=0.5, norm="group")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH * args.steps, *shape, generator=gen)
    y = torch.randint(0, 10, (len(x),), generator=gen)
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first = {n: p.detach().double().clone() for n, p in model.named_parameters()}

    t1 = torch_trajectory(model, batches, torch.float32, args.threads)
    t2 = torch_trajectory(model, batches, torch.float32, 2)
    t64 = torch_trajectory(model, batches, torch.float64, args.threads)
    g64 = torch_gradients(model, *batches[0], torch.float64, args.threads)
    g_scale = max(float(g.abs().max()) for g in g64.values())

    def grad_err(g: Snapshot) -> float:
        return max_diff(g, g64)[0] / g_scale

    grads = {
        "torch fp32, 1 thread": grad_err(torch_gradients(model, *batches[0], torch.float32, 1)),
        "torch fp32, 2 threads": grad_err(torch_gradients(model, *batches[0], torch.float32, 2)),
    }
    runs: dict[str, list[Snapshot]] = {}
    for label, two_pass in (("runtime GroupNorm kernel", False), ("two-pass GroupNorm", True)):
        program = training_program(model, shape, BATCH, two_pass_group_norm=two_pass)
        runs[label] = runtime_trajectory(program, start, batches)
        grads[f"ExecuTorch, {label}"] = grad_err(runtime_gradients(program, start, *batches[0]))

    steps = []
    for k in range(args.steps):
        row: dict[str, Any] = {
            "step": k + 1,
            "torch_2threads_vs_1": max_diff(t2[k], t1[k])[0],
            "torch_fp32_vs_fp64": max_diff(t1[k], t64[k])[0],
            "max_param": max(float(v.abs().max()) for v in t64[k].values()),
            "max_change": max_diff(t64[k], first)[0],
        }
        for label, traj in runs.items():
            row[f"{label} vs torch fp32"], row[f"{label} worst parameter"] = max_diff(
                traj[k], t1[k]
            )
            row[f"{label} vs torch fp64"] = max_diff(traj[k], t64[k])[0]
        steps.append(row)

    table = Table(
        title=f"MobileNetV2 x0.5 GroupNorm, 3x{args.size}x{args.size}, batch {BATCH}: "
        "max |parameter difference| after each SGD step"
    )
    cols = [
        ("step", "step", "{}"),
        ("ET kernel vs torch", "runtime GroupNorm kernel vs torch fp32", "{:.1e}"),
        ("ET kernel vs fp64", "runtime GroupNorm kernel vs torch fp64", "{:.1e}"),
        ("ET two-pass vs torch", "two-pass GroupNorm vs torch fp32", "{:.1e}"),
        ("ET two-pass vs fp64", "two-pass GroupNorm vs torch fp64", "{:.1e}"),
        ("torch 2 vs 1 thread", "torch_2threads_vs_1", "{:.1e}"),
        ("torch fp32 vs fp64", "torch_fp32_vs_fp64", "{:.1e}"),
        ("max |param|", "max_param", "{:.2f}"),
        ("max change", "max_change", "{:.1e}"),
    ]
    for head, _, _ in cols:
        table.add_column(head)
    for r in steps:
        table.add_row(*(fmt.format(r[key]) for _, key, fmt in cols))
    console.print(table)
    for label in runs:
        console.print(
            f"{label}: worst parameter after the last step: {steps[-1][label + ' worst parameter']}"
        )
    table = Table(title="Gradient of batch 1 at the start weights: max |g - g_fp64| / max |g_fp64|")
    table.add_column("run")
    table.add_column("relative difference")
    for label, value in grads.items():
        table.add_row(label, f"{value:.1e}")
    console.print(table)

    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "command": f"python benchmarks/executorch_drift.py --steps {args.steps} "
                f"--size {args.size} --threads {args.threads}",
                "machine": f"{platform.machine()}, torch {torch.__version__}",
                "group_norm_kernel": kernel_rows,
                "steps": steps,
                "first_gradient_rel_diff": grads,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
