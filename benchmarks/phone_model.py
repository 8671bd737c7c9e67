"""The phone model: MobileNetV2 x0.5 with GroupNorm (trainable through ExecuTorch)
against the BatchNorm original, trained centrally on real digits.

    python benchmarks/phone_model.py [--epochs 8] [--seeds 2] [--size 32] [--threads 1]
        [--only batch-sgd,group-sgd] [--out benchmarks/results/phone_model.json]

Every variant trains with ``train_local`` on the digits federation's whole private pool
(1,337 scikit-learn digits) and is scored on its test set (360 images), the 8x8 images
resized bilinearly to ``--size`` x ``--size`` (32: MobileNetV2's design resolution; 0
keeps 8x8), one channel, same epochs, batch 16 and shuffling: the BatchNorm model with
Adam (lr 1e-3, the former android-phone setting) and with SGD, the GroupNorm model with
SGD (momentum 0.9, lr 0.01: what the ExecuTorch runtime offers; the android-phone
profile now) and with Adam. Prints a table and writes benchmarks/results/phone_model.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from takfl.config import load_federation
from takfl.config.profile import TrainingSpec
from takfl.federation_data import build_federation_data
from takfl.models import build_model
from takfl.training import accuracy, train_local

RESULTS = Path(__file__).parent / "results" / "phone_model.json"
VARIANTS: list[tuple[str, str, str, float]] = [  # label, norm, optimizer, lr
    ("BatchNorm, Adam 1e-3", "batch", "adam", 1e-3),
    ("BatchNorm, SGD 0.01", "batch", "sgd", 1e-2),
    ("GroupNorm, SGD 0.01 (ExecuTorch)", "group", "sgd", 1e-2),
    ("GroupNorm, Adam 1e-3", "group", "adam", 1e-3),
]


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) images resized bilinearly to (N, C, size, size); 0 keeps them."""
    if size <= 0 or x.shape[-1] == size:
        return x
    return torch.nn.functional.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--size", type=int, default=32, help="image side (0: 8x8 as stored)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma list of NORM-OPTIMIZER, e.g. group-sgd")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    only = {v.strip() for v in args.only.split(",") if v.strip()}
    torch.set_num_threads(args.threads)
    data = build_federation_data(load_federation("digits"))
    x = resize(torch.cat([c[1] for c in data.clients.values()]), args.size)
    y = torch.cat([c[2] for c in data.clients.values()])
    test_x = resize(data.test_x, args.size)
    shape = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
    rows: list[dict[str, Any]] = []
    for label, norm, opt, lr in VARIANTS:
        if only and f"{norm}-{opt}" not in only:
            continue
        accs = []
        start = time.monotonic()
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = build_model("mobilenetv2", 10, shape, width_mult=0.5, norm=norm)
            spec = TrainingSpec(
                epochs=args.epochs,
                batch_size=16,
                optimizer=opt,
                learning_rate=lr,
            )
            train_local(model, x, y, spec, seed=seed)
            accs.append(accuracy(model, test_x, data.test_y))
        rows.append(
            {
                "variant": label,
                "accuracies": accs,
                "mean": sum(accs) / len(accs),
                "seconds": time.monotonic() - start,
                "norm": norm,
                "optimizer": opt,
                "learning_rate": lr,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    table = Table(
        title=f"MobileNetV2 x0.5 on digits ({len(x)} train, {len(test_x)} test, "
        f"{shape[1]}x{shape[2]}, {args.epochs} epochs, {args.seeds} seeds)"
    )
    for col in ("variant", "test accuracy % (mean)", "per seed"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["variant"], f"{r['mean']:.1f}", ", ".join(f"{a:.1f}" for a in r["accuracies"])
        )
    Console(width=160).print(table)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/phone_model.py "
                f"--epochs {args.epochs} --seeds {args.seeds} --size {args.size} "
                f"--threads {args.threads}" + (f" --only '{args.only}'" if only else ""),
                "input_shape": list(shape),
                "machine": f"{platform.machine()}, torch {torch.__version__}",
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
