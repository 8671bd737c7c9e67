"""Clients per second of one round's local training in ``simulate``: the loop against vmap.

    python benchmarks/simulate_clients.py [--device cpu|cuda] [--repeats 3] [--threads 1]
                                          [--cases digits-S,digits-M,digits-L,cifar-resnet8]

For each case, G sampled clients of one prototype train from the same global weights on
synthetic data (random inputs, random labels; unequal client sizes drawn around the
case's mean, so partial last batches occur), with the prototype's training settings:

* loop: ``takfl.training.train_local`` client after client (the sequential path of the
  in-process transport, ``simulate --no-vectorise``);
* vectorised: ``takfl.vectorised_training.train_clients`` (``simulate --vectorise``).

The digits cases use the bundled digits federation's models and settings (8x8 inputs);
``cifar-resnet8`` is CIFAR-shaped (3x32x32, 10 classes) with 16 clients, the resnet8 of
cifar10-homo's S tier, Adam with weight decay 5e-5, batch 64, one epoch (fewer samples
and epochs than the real federation, so that the CPU run stays short; ``--cifar-samples``
and ``--cifar-epochs`` scale it up). Time is the median of ``--repeats`` runs after one
warm-up run of each; both paths' trained weights are compared (largest absolute
difference). Prints a table and writes benchmarks/results/simulate_clients.json
(``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from takfl.config.profile import TrainingSpec
from takfl.models import build_model, count_parameters
from takfl.training import train_local
from takfl.vectorised_training import ClientData, train_clients

RESULTS = Path(__file__).resolve().parent / "results" / "simulate_clients.json"


@dataclass(frozen=True, kw_only=True)
class Case:
    name: str
    builder: str
    args: dict[str, Any]
    input_shape: tuple[int, int, int]
    clients: int
    mean_samples: int
    spec: TrainingSpec


def cases(cifar_samples: int, cifar_epochs: int, clients: int) -> dict[str, Case]:
    digits = (1, 8, 8)
    return {
        # the digits federation's prototypes (models, epochs, batch, optimiser, lr)
        "digits-S": Case(
            name="digits-S",
            builder="mlp_digits",
            args={"width": 8},
            input_shape=digits,
            clients=clients,
            mean_samples=10,
            spec=TrainingSpec(epochs=10, batch_size=8, optimizer="sgd", learning_rate=0.003),
        ),
        "digits-M": Case(
            name="digits-M",
            builder="cnn_digits_small",
            args={},
            input_shape=digits,
            clients=clients,
            mean_samples=56,
            spec=TrainingSpec(epochs=5, batch_size=16, optimizer="adam", learning_rate=0.002),
        ),
        "digits-L": Case(
            name="digits-L",
            builder="cnn_digits_large",
            args={},
            input_shape=digits,
            clients=clients,
            mean_samples=280,
            spec=TrainingSpec(epochs=2, batch_size=32, optimizer="adam", learning_rate=0.001),
        ),
        "cifar-resnet8": Case(
            name="cifar-resnet8",
            builder="resnet8",
            args={},
            input_shape=(3, 32, 32),
            clients=clients,
            mean_samples=cifar_samples,
            spec=TrainingSpec(
                epochs=cifar_epochs,
                batch_size=64,
                optimizer="adam",
                learning_rate=0.001,
                weight_decay=5e-5,
            ),
        ),
    }


def synthetic_clients(case: Case, seed: int = 0) -> list[ClientData]:
    """G clients with sizes spread over [mean/2, 3*mean/2], random inputs and labels."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = max(2, case.mean_samples // 2), max(3, case.mean_samples * 3 // 2)
    sizes = torch.randint(lo, hi + 1, (case.clients,), generator=g).tolist()
    return [
        ClientData(
            torch.randn(n, *case.input_shape, generator=g),
            torch.randint(0, 10, (n,), generator=g),
            seed=1000 + i,
        )
        for i, n in enumerate(sizes)
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_loop(
    model: torch.nn.Module,
    glob: dict,
    clients: list[ClientData],
    spec: TrainingSpec,
    device: torch.device,
) -> list[dict[str, torch.Tensor]]:
    out = []
    for c in clients:
        model.load_state_dict(glob)
        out.append(train_local(model, c.x, c.y, spec, seed=c.seed, device=device).state)
    return out


def run_vectorised(
    model: torch.nn.Module,
    glob: dict,
    clients: list[ClientData],
    spec: TrainingSpec,
    device: torch.device,
) -> list[dict[str, torch.Tensor]]:
    model.load_state_dict(glob)
    return [r.state for r in train_clients(model, clients, spec, device=device)]


def timed(fn: Any, repeats: int, device: torch.device) -> tuple[float, Any]:
    out = fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(case: Case, device: torch.device, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(case.builder, 10, case.input_shape, **case.args).to(device)
    glob = {k: v.detach().clone() for k, v in model.state_dict().items()}
    clients = synthetic_clients(case)
    loop_s, loop_states = timed(
        lambda: run_loop(model, glob, clients, case.spec, device), repeats, device
    )
    vec_s, vec_states = timed(
        lambda: run_vectorised(model, glob, clients, case.spec, device), repeats, device
    )
    diff = max(
        float((a[k].double() - b[k].double()).abs().max())
        for a, b in zip(loop_states, vec_states, strict=True)
        for k in a
    )
    return {
        "case": case.name,
        "model": case.builder,
        "model_args": case.args,
        "parameters": count_parameters(model),
        "input_shape": list(case.input_shape),
        "clients": case.clients,
        "client_samples": [len(c.x) for c in clients],
        "training": case.spec.model_dump(exclude={"threads", "memory_limit_mb", "backend"}),
        "loop_s": loop_s,
        "vectorised_s": vec_s,
        "loop_clients_per_s": case.clients / loop_s,
        "vectorised_clients_per_s": case.clients / vec_s,
        "speedup": loop_s / vec_s,
        "max_abs_weight_difference": diff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--clients", type=int, default=16, help="sampled clients per case")
    ap.add_argument("--cases", default="digits-S,digits-M,digits-L,cifar-resnet8")
    ap.add_argument("--cifar-samples", type=int, default=128, help="mean samples per client")
    ap.add_argument("--cifar-epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    table_cases = cases(a.cifar_samples, a.cifar_epochs, a.clients)
    rows = []
    for name in [n.strip() for n in a.cases.split(",") if n.strip()]:
        rows.append(measure(table_cases[name], device, a.repeats))
        print(json.dumps({k: rows[-1][k] for k in ("case", "loop_s", "vectorised_s", "speedup")}))
    table = Table(title=f"one round's local training, {a.clients} clients, device {device}")
    for col in (
        "case",
        "model (params)",
        "samples/client",
        "loop clients/s",
        "vectorised clients/s",
        "speedup",
        "max |dw|",
    ):
        table.add_column(col)
    for r in rows:
        s = r["client_samples"]
        table.add_row(
            r["case"],
            f"{r['model']} ({r['parameters']:,})",
            f"{min(s)}-{max(s)}",
            f"{r['loop_clients_per_s']:.2f}",
            f"{r['vectorised_clients_per_s']:.2f}",
            f"{r['speedup']:.2f}x",
            f"{r['max_abs_weight_difference']:.1e}",
        )
    Console(width=150).print(table)
    machine = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "machine": machine,
                "repeats": a.repeats,
                "data": "synthetic (random inputs and labels)",
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
