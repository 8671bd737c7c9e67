"""Which zoo models train through ExecuTorch, and how closely: the phone tier's table.

    python benchmarks/executorch_bench.py [--steps 6] [--size 16] [--threads 1] [--only NAME,...]

For every registered model (image models at ``--size`` x ``--size`` pixels, 0 for their
default input shape; 1D models at their default length; MobileNetV2 also at width 0.5
with BatchNorm and with GroupNorm, the phone variant): build the training program
(forward, cross-entropy, backward; batch 8) and run ``--steps`` SGD steps (lr 0.01,
momentum 0.9) through the ExecuTorch runtime and in torch from the same weights on the
same batches (random inputs, fixed seed); report the largest parameter difference, or
why the program could not be built. Then the XNNPACK inference program and its largest
logit difference against torch (eval mode), for the models that train (``--all-inference``:
for every model). Each drift is put beside the difference between torch's
own float32 and float64 runs of the same steps (how far float rounding alone moves it);
a model trains through ExecuTorch when its drift is within the parity bound of
export.executorch_export (1e-4, or 4x that float distance when larger). Prints a table
and writes benchmarks/results/executorch.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from export.executorch_export import (
    TRAINING_PARITY_TOLERANCE,
    ProgramExportError,
    inference_parity,
    inference_program,
    training_parity,
    training_program,
)
from takfl.config.profile import TrainingSpec
from takfl.models import build_model, get_entry, model_names

RESULTS = Path(__file__).parent / "results" / "executorch.json"
BATCH = 8


def cases() -> list[tuple[str, str, dict[str, Any]]]:
    """The phone model and its BatchNorm original first, then the models the bundled
    profiles and federations use, then the rest of the registry."""
    out: list[tuple[str, str, dict[str, Any]]] = [
        ("mobilenetv2 x0.5 (group norm)", "mobilenetv2", {"width_mult": 0.5, "norm": "group"}),
        ("mobilenetv2 x0.5 (batch norm)", "mobilenetv2", {"width_mult": 0.5, "norm": "batch"}),
    ]
    used = ["resnet8", "resnet14", "resnet18", "mlp1d", "cnn1d_small", "resnet1d"]
    used += ["mlp_digits", "cnn_digits_small", "cnn_digits_large", "vit_s", "vgg16"]
    rest = [n for n in model_names() if n not in used]
    probe: list[tuple[str, str, dict[str, Any]]] = [(MAXPOOL_PROBE, MAXPOOL_PROBE, {})]
    return out + [(name, name, {}) for name in used + rest] + probe


MAXPOOL_PROBE = "conv + MaxPool2d (probe)"


def maxpool_probe() -> torch.nn.Module:
    """A small CNN with MaxPool2d on (1, 8, 8): the layer that trains wrongly."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 10)
    )


def input_shape(name: str, size: int) -> tuple[int, int, int]:
    """``name``'s default input shape, with image sides set to ``size`` (0: unchanged);
    1D signals (height 1) and the 8x8 digits models keep theirs."""
    c, h, w = get_entry(name).default_input_shape
    if size <= 0 or h == 1 or h <= size:
        return (c, h, w)
    return (c, size, size)


def save(rows: list[dict[str, Any]], steps: int, size: int, threads: int) -> None:
    """Merge ``rows`` into the results file (rows of other models are kept)."""
    RESULTS.parent.mkdir(exist_ok=True)
    existing = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}
    labels = {r["model"] for r in rows}
    kept = [r for r in existing.get("rows", []) if r["model"] not in labels]
    RESULTS.write_text(
        json.dumps(
            {
                "command": "python benchmarks/executorch_bench.py "
                f"--steps {steps} --size {size} --threads {threads}",
                "machine": f"{platform.machine()}, Python {platform.python_version()}, "
                f"torch {torch.__version__}",
                "steps": steps,
                "rows": kept + rows,
            },
            indent=2,
        )
        + "\n"
    )


def first_step_gradients(
    model: torch.nn.Module, program: bytes, x: torch.Tensor, y: torch.Tensor
) -> float:
    """Largest gradient difference of one batch relative to the largest torch gradient:
    whether the runtime's backward kernels agree before any step compounds."""
    from takfl.ondevice import METHOD, load_program, load_weights, program_parameters

    module = load_program(program)
    load_weights(program_parameters(module, (x, y)), model.state_dict())
    module.forward_backward(METHOD, (x, y))
    grads = {k.removeprefix("model."): v for k, v in module.named_gradients().items()}
    ref = copy.deepcopy(model).train()
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    worst = 0.0
    for n, p in ref.named_parameters():
        if p.grad is not None:
            scale = float(p.grad.abs().max()) or 1.0
            worst = max(worst, float((grads[n] - p.grad).abs().max()) / scale)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--size", type=int, default=16, help="image side (0: default shapes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma list of case labels")
    ap.add_argument(
        "--all-inference",
        action="store_true",
        help="build inference programs of models that do not train through ExecuTorch too",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = TrainingSpec(epochs=1, batch_size=BATCH, optimizer="sgd", learning_rate=0.01)
    rows: list[dict[str, Any]] = []
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    for label, name, kw in cases():
        if only and label not in only:
            continue
        shape = (1, 8, 8) if name == MAXPOOL_PROBE else input_shape(name, args.size)
        torch.manual_seed(0)
        model = maxpool_probe() if name == MAXPOOL_PROBE else build_model(name, 10, shape, **kw)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(BATCH * args.steps, *shape, generator=gen)
        y = torch.randint(0, 10, (len(x),), generator=gen)
        row: dict[str, Any] = {
            "model": label,
            "builder": name,
            "args": kw,
            "input_shape": list(shape),
        }
        start = time.monotonic()
        try:
            program = training_program(model, shape, BATCH)
            row["train_program_kb"] = len(program) / 1024
            parity = training_parity(model, program, x, y, spec)
            row["train_steps"] = parity.steps
            row["train_max_param_diff"] = parity.max_param_diff
            row["float64_drift"] = parity.float_noise
            row["trains"] = parity.agrees(TRAINING_PARITY_TOLERANCE)
            if not row["trains"]:
                row["reason"] = "parameters drift from torch beyond the parity bound"
            if parity.max_param_diff > TRAINING_PARITY_TOLERANCE:
                row["first_step_grad_rel_diff"] = first_step_gradients(
                    model, program, x[:BATCH], y[:BATCH]
                )
        except ProgramExportError as e:
            row["trains"], row["reason"] = False, str(e)
        except Exception as e:  # a runtime failure is a result of the table
            row["trains"], row["reason"] = (
                False,
                f"{type(e).__name__}: {str(e).splitlines()[0][:160]}",
            )
        row["train_s"] = time.monotonic() - start
        if not row["trains"] and not args.all_inference:
            rows.append(row)
            print(json.dumps(row), flush=True)
            save(rows, args.steps, args.size, args.threads)
            continue
        try:
            inference = inference_program(model, shape)
            row["inference_program_kb"] = len(inference) / 1024
            row["inference_max_diff"] = inference_parity(model, inference, x[:BATCH])
        except Exception as e:  # as above
            row["inference_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(rows, args.steps, args.size, args.threads)

    table = Table(
        title=f"ExecuTorch programs ({args.steps} SGD steps, batch {BATCH}, lr 0.01, momentum 0.9)"
    )
    cols = ("model", "trains", "max param diff", "torch fp32 vs fp64", "train KB", "inference diff")
    for col in (*cols, "reason"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["model"],
            "yes" if r["trains"] else "no",
            f"{r['train_max_param_diff']:.1e}" if "train_max_param_diff" in r else "-",
            f"{r['float64_drift']:.1e}" if "float64_drift" in r else "-",
            f"{r['train_program_kb']:.0f}" if "train_program_kb" in r else "-",
            f"{r['inference_max_diff']:.1e}"
            if "inference_max_diff" in r
            else r.get("inference_error", "-"),
            r.get("reason", ""),
        )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
