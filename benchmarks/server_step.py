"""Wall time of one TAKFL server step against FedDF and a naive reference-style loop.

    python benchmarks/server_step.py [--config digits] [--device cpu|cuda] [--repeats 3]
    python benchmarks/server_step.py --paper-scale [--device cuda] [--public-size N]
        [--epochs E | --steps S] [--clients C] [--val-size V] [--candidates-per-exponent K]
        [--precision fp32|bf16] [--compile] [--peak-tflops P]

Digits mode: all variants start from the same client models (one real round of local
training on the digits federation) and run the same distillation step counts
and the same number of merge candidates:

- takfl (auto, batched, sequential): teacher logits computed once per client
  model (inference mode) and averaged as they arrive; public set held as one
  tensor on the device; the m x m distillations, a student's m run together
  (batched, vmapped), one after another (sequential), or as ``distill.batched:
  auto`` picks; candidate merges scored through one scratch state with
  ``torch.func.functional_call``.
- feddf: the same aggregation, one averaged target, m distillations.
- naive: the structure of the public reference code: every distillation batch
  re-runs all of the teacher's client models (autograd on), batches are
  re-assembled from per-item tensors, and every candidate merge is scored on a
  deep copy of the model.

Paper-scale mode (``--paper-scale``): the cifar10-homo federation's students
(ResNet-8/14/18), distillation settings (batch 128, 5 epochs, Adam 1e-5, weight
decay 5e-4, gamma 0.01), public-set size (50,000, the CIFAR-100 train set), 500
validation images and heuristic lambda candidates, with the clients one round
samples (10/4/2). Inputs, labels and client models are SYNTHETIC (random tensors of
CIFAR shape, randomly initialised client models): the figures are timings only.
The options shrink it to fit a CPU.

Every variant reports seconds per round, student images per second (images passed
through a student in distillation, all distillations together, per second of the
whole step), peak memory during the variant (torch.cuda.max_memory_allocated on
CUDA; peak resident set size sampled every 5 ms on CPU), and achieved FLOP/s from
FLOPs counted in one separate, untimed run under
``torch.utils.flop_counter.FlopCounterMode``; with a known or given peak
(``--peak-tflops``, bf16 dense) also the fraction of it.

Prints a table and writes benchmarks/results/server_step.json (digits) or
benchmarks/results/server_step_paper.json (paper scale).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from coordinator.engine import _Collector
from coordinator.inputs import pick_device, prototype_models
from takfl.algorithms import resolve_algorithm
from takfl.config import load_federation, prototype_training
from takfl.config.base import ModelSpec
from takfl.config.federation import FederationConfig
from takfl.distill import batch_indices, kd_loss
from takfl.fedavg import fedavg
from takfl.federation_data import FederationData, build_federation_data
from takfl.lambdas import heuristic_candidates
from takfl.models import build_model
from takfl.robust import make_aggregator
from takfl.server import PrototypeInput, StepData, distill_settings, server_step
from takfl.state import State
from takfl.task_arithmetic import merge, simplex_candidates, task_vector
from takfl.training import predict_logits, train_local

Models = dict[str, ModelSpec]
Clients = dict[str, list[tuple[State, int]]]  # prototype -> (client state, samples)


def client_models(cfg, data, models):  # type: ignore[no-untyped-def]
    """One round of real local training for every client: {prototype: [(state, n)]}."""
    out: dict[str, list[tuple[State, int]]] = {p.name: [] for p in cfg.prototypes}
    inits: dict[str, State] = {}
    for i, p in enumerate(cfg.prototypes):
        torch.manual_seed(i)
        inits[p.name] = build_model(
            models[p.name].builder, data.num_classes, data.input_shape, **models[p.name].args
        ).state_dict()
    for cid, (proto, x, y) in data.clients.items():
        spec = models[proto]
        m = build_model(spec.builder, data.num_classes, data.input_shape, **spec.args)
        m.load_state_dict(inits[proto])
        res = train_local(m, x, y, prototype_training(cfg, proto), seed=hash(cid) % 1000)
        out[proto].append((res.state, res.num_samples))
    return out


def aggregate(cfg, clients, models, data, device, keep: bool):  # type: ignore[no-untyped-def]
    """Streaming FedAvg + teacher logits once per client model."""
    protos = []
    public = data.public_x.to(device)
    for p in cfg.prototypes:
        spec = models[p.name]
        scratch = build_model(spec.builder, data.num_classes, data.input_shape, **spec.args).to(
            device
        )
        reference = {k: v.detach().clone() for k, v in scratch.state_dict().items()}
        col = _Collector(make_aggregator(cfg.aggregation), reference, keep)
        for state, n in clients[p.name]:
            col.fedavg.add(state, float(n))
            scratch.load_state_dict(state)
            logits = predict_logits(scratch, public)
            col.logits.add(logits)
            if keep:
                col.client_logits.append(logits)
        protos.append(
            PrototypeInput(
                name=p.name,
                model=scratch,
                avg_state=col.fedavg.result(),
                mean_logits=col.logits.mean(),
                num_clients=col.logits.count,
                client_logits=col.client_logits,
            )
        )
    return protos


def naive_teachers(
    cfg: FederationConfig, clients: Clients, models: Models, data: Data, device: torch.device
) -> tuple[dict[str, list[torch.nn.Module]], dict[str, State]]:
    """Every client model on the device, per prototype (the teachers the reference code
    re-runs), and each prototype's FedAvg state."""
    teachers: dict[str, list[torch.nn.Module]] = {}
    avgs: dict[str, State] = {}
    for p in cfg.prototypes:
        spec = models[p.name]
        teachers[p.name] = []
        for state, _ in clients[p.name]:
            m = build_model(spec.builder, data.num_classes, data.input_shape, **spec.args)
            m.load_state_dict(state)
            teachers[p.name].append(m.to(device))
        avgs[p.name] = fedavg(
            [s for s, _ in clients[p.name]], [float(n) for _, n in clients[p.name]]
        )
    return teachers, avgs


def naive_distill(
    cfg: FederationConfig,
    base_model: torch.nn.Module,
    start_model: torch.nn.Module,
    teachers: list[torch.nn.Module],
    items: list[torch.Tensor],
    avg: State,
    device: torch.device,
    seed: int,
) -> State:
    """One distillation as the reference code runs it; its task vector against ``avg``."""
    d = cfg.algorithm.distill
    settings = distill_settings(cfg.algorithm)
    gamma = d.self_reg_weight if cfg.algorithm.name in ("takfl-reg", "takfl-scaled") else 0.0
    model = copy.deepcopy(base_model).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=d.learning_rate, weight_decay=d.weight_decay)
    for idx in batch_indices(len(items), settings, seed):
        x = torch.stack([items[int(i)] for i in idx]).to(device)
        z = torch.stack([t(x) for t in teachers]).mean(0)  # grad on
        s = model(x)
        loss = kd_loss(s, z.detach(), d.temperature)
        if gamma > 0:
            with torch.no_grad():
                own = start_model(x)
            loss = loss + gamma * kd_loss(s, own, d.self_reg_temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return task_vector({k: v.cpu() for k, v in model.state_dict().items()}, avg)


def naive_best(
    base_model: torch.nn.Module,
    avg: State,
    vectors: list[State],
    cands: list[torch.Tensor],
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    device: torch.device,
) -> float:
    """The best validation accuracy over the candidate merges, each on a deep copy."""
    best = -1.0
    for lam in cands:
        cand = copy.deepcopy(base_model)
        cand.load_state_dict(merge(avg, vectors, lam))
        cand.to(device).eval()
        with torch.no_grad():
            out = cand(val_x)
            acc = float((out.argmax(1) == val_y).float().mean())
            F.cross_entropy(out, val_y)
        best = max(best, acc)
    return best


def naive_step(cfg, clients, models, data, device, seed: int, lambdas: str = "search") -> None:  # type: ignore[no-untyped-def]
    """TAKFL with the reference code's structure (same step and candidate counts): the
    teacher's client models re-run inside every distillation batch (autograd on), the
    student's own start re-run for the self-regulariser, batches rebuilt from per-item
    tensors, a deep copy of the model per candidate merge."""
    lam_spec = cfg.algorithm.lambdas
    items = [data.public_x[i] for i in range(len(data.public_x))]  # per-item "dataset"
    val_x, val_y = data.val_x.to(device), data.val_y.to(device)
    teachers, avgs = naive_teachers(cfg, clients, models, data, device)
    m_teachers = len(cfg.prototypes)
    if lambdas == "heuristic":
        cands = heuristic_candidates(
            m_teachers, lam_spec.candidates_per_exponent, lam_spec.heuristic_order, seed
        )
    else:
        cands = list(simplex_candidates(m_teachers, lam_spec.search_candidates, seed))
    for j, student in enumerate(cfg.prototypes):
        spec = models[student.name]
        base_model = build_model(spec.builder, data.num_classes, data.input_shape, **spec.args)
        base_model.load_state_dict(avgs[student.name])
        start_model = copy.deepcopy(base_model).to(device).eval()
        avg = avgs[student.name]
        vectors = [
            naive_distill(
                cfg, base_model, start_model, teachers[t.name], items, avg, device, seed * 1000 + j
            )
            for t in cfg.prototypes
        ]
        naive_best(base_model, avg, vectors, cands, val_x, val_y, device)


def timed(fn, repeats: int, device: torch.device) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak device memory (CUDA) or peak resident set size sampled every 5 ms (CPU)
    while the block runs, in bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())


def count_flops(fn: Callable[[], None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity).
KNOWN_BF16_PEAK_TFLOPS = {
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "A100": 312.0,
}


def bf16_peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in KNOWN_BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def measure(
    fns: dict[str, Callable[[], None]],
    images: dict[str, int],
    repeats: int,
    device: torch.device,
    peak_tflops: float | None,
    flops: bool,
) -> dict[str, dict]:
    """Per variant: seconds of every repeat, median, student images/s, peak memory,
    FLOPs (one separate run) and the achieved rate. Repeats are interleaved (every
    variant once, then again), so drift in the machine's load spreads over all."""
    for fn in fns.values():
        fn()  # warm-up: allocator, lazy init, vmap probe
    secs: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, int] = dict.fromkeys(fns, 0)
    for _ in range(repeats):
        for name, fn in fns.items():
            with PeakMemory(device) as mem:
                secs[name] += timed(fn, 1, device)
            peaks[name] = max(peaks[name], mem.peak)
    out: dict[str, dict] = {}
    counted: dict[str, int] = {}
    for name in fns:
        med = statistics.median(secs[name])
        row: dict = {
            "seconds": secs[name],
            "median_s": med,
            "images_per_s": images[name] / med,
            "peak_memory_bytes": peaks[name],
        }
        if flops:
            # Useful FLOPs: the batched variants do the sequential one's work, counted on
            # it, since FlopCounterMode over-counts the backward of the grouped
            # convolutions that vmap lowers a batched convolution to.
            same = (
                "takfl-sequential"
                if name.startswith("takfl") and "takfl-sequential" in fns
                else name
            )
            if same not in counted:
                counted[same] = count_flops(fns[same])
            total = counted[same]
            row["flops"] = total
            row["achieved_gflops_per_s"] = total / med / 1e9
            row["fraction_of_bf16_peak"] = (
                total / med / (peak_tflops * 1e12) if peak_tflops else None
            )
        out[name] = row
    return out


def with_distill(cfg: FederationConfig, **changes: object) -> FederationConfig:
    algo = cfg.algorithm
    distill = algo.distill.model_copy(update=changes)
    return cfg.model_copy(update={"algorithm": algo.model_copy(update={"distill": distill})})


def variant_fns(cfg, clients, models, data, device, lambdas: str) -> dict[str, Callable[[], None]]:  # type: ignore[no-untyped-def]
    ev = StepData(data.public_x.to(device), data.val_x.to(device), data.val_y.to(device))

    def ours(name: str, batched: bool | str):  # type: ignore[no-untyped-def]
        spec = with_distill(cfg, batched=batched).algorithm
        algo = resolve_algorithm(spec, name, lambda_strategy=lambdas)

        def run() -> None:
            protos = aggregate(cfg, clients, models, data, device, algo.needs_client_logits)
            server_step(protos, ev, algo, seed=0)

        return run

    takfl = cfg.algorithm.name if cfg.algorithm.name.startswith("takfl") else "takfl"
    return {
        "takfl-auto": ours(takfl, "auto"),
        "takfl-batched": ours(takfl, True),
        "takfl-sequential": ours(takfl, False),
        "feddf": ours("feddf", False),
        "naive-takfl": lambda: naive_step(cfg, clients, models, data, device, 0, lambdas),
    }


def student_images(cfg: FederationConfig, n_public: int) -> dict[str, int]:
    """Images passed through a student in distillation by each variant."""
    settings = distill_settings(cfg.algorithm)
    m = len(cfg.prototypes)
    steps = settings.total_steps(n_public)
    per = (
        n_public * settings.epochs
        if settings.epochs
        else steps * min(settings.batch_size, n_public)
    )
    return {
        "takfl-auto": m * m * per,
        "takfl-batched": m * m * per,
        "takfl-sequential": m * m * per,
        "feddf": m * per,
        "naive-takfl": m * m * per,
    }


class SyntheticData:
    """CIFAR-shaped random tensors standing in for the federation's data (timing only)."""

    def __init__(self, n_public: int, n_val: int, num_classes: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        self.input_shape = (3, 32, 32)
        self.public_x = torch.randn(n_public, *self.input_shape, generator=g)
        self.val_x = torch.randn(n_val, *self.input_shape, generator=g)
        self.val_y = torch.randint(0, num_classes, (n_val,), generator=g)


Data = FederationData | SyntheticData


def synthetic_clients(cfg, models, data, cap: int | None) -> dict[str, list[tuple[State, int]]]:  # type: ignore[no-untyped-def]
    """Randomly initialised client models, as many per prototype as one round samples."""
    out: dict[str, list[tuple[State, int]]] = {}
    for i, p in enumerate(cfg.prototypes):
        k = max(1, math.ceil(p.sample_rate * p.clients - 1e-9))
        if cap is not None:
            k = min(k, cap)
        spec = models[p.name]
        out[p.name] = []
        for c in range(k):
            torch.manual_seed(1000 * i + c)
            m = build_model(spec.builder, data.num_classes, data.input_shape, **spec.args)
            out[p.name].append((m.state_dict(), 100 + c))
    return out


def print_table(title: str, rows: dict[str, dict], device: torch.device) -> None:
    table = Table(title=title)
    mem = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB"
    for col in (
        "variant",
        "median s",
        "min s",
        "vs batched",
        "student img/s",
        mem,
        "GFLOP/s",
        "of bf16 peak",
    ):
        table.add_column(col, justify="right" if col != "variant" else "left")
    base = rows["takfl-batched"]["median_s"]
    for k, r in rows.items():
        frac = r.get("fraction_of_bf16_peak")
        table.add_row(
            k,
            f"{r['median_s']:.2f}",
            f"{min(r['seconds']):.2f}",
            f"{r['median_s'] / base:.2f}x",
            f"{r['images_per_s']:.0f}",
            f"{r['peak_memory_bytes'] / 2**20:.0f}",
            f"{r['achieved_gflops_per_s']:.1f}" if "achieved_gflops_per_s" in r else "-",
            f"{100 * frac:.2f}%" if frac else "unknown",
        )
    Console(width=150).print(table)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--config", default=None, help="digits (default), or cifar10-homo with --paper-scale"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--paper-scale",
        action="store_true",
        help="ResNet-8/14/18 on synthetic CIFAR-shaped tensors",
    )
    ap.add_argument(
        "--public-size", type=int, default=None, help="paper scale: public images (50000)"
    )
    ap.add_argument(
        "--val-size", type=int, default=None, help="paper scale: validation images (500)"
    )
    ap.add_argument("--epochs", type=int, default=None, help="distillation epochs (paper: 5)")
    ap.add_argument("--steps", type=int, default=None, help="distillation steps instead of epochs")
    ap.add_argument("--batch-size", type=int, default=None, help="distillation batch (paper: 128)")
    ap.add_argument("--clients", type=int, default=None, help="cap on client models per prototype")
    ap.add_argument(
        "--candidates-per-exponent", type=int, default=None, help="heuristic lambdas (15)"
    )
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile the distillation forward")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device bf16 dense peak")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting run")
    ap.add_argument("--variants", default=None, help="comma-separated subset to run")
    return ap


def configure(args: argparse.Namespace) -> FederationConfig:
    """The federation to time, with the distillation and lambda options applied."""
    config = args.config or ("cifar10-homo" if args.paper_scale else "digits")
    cfg = load_federation(config)
    # a fixed budget: every variant runs every distillation to the configured steps
    distill_changes: dict[str, object] = {
        "precision": args.precision,
        "compile": args.compile,
        "adaptive": False,
    }
    if args.epochs is not None:
        distill_changes.update(epochs=args.epochs)
    if args.steps is not None:
        distill_changes.update(epochs=None, steps=args.steps)
    if args.batch_size is not None:
        distill_changes.update(batch_size=args.batch_size)
    cfg = with_distill(cfg, **distill_changes)
    if args.candidates_per_exponent is not None:
        lam = cfg.algorithm.lambdas.model_copy(
            update={"candidates_per_exponent": args.candidates_per_exponent}
        )
        cfg = cfg.model_copy(
            update={"algorithm": cfg.algorithm.model_copy(update={"lambdas": lam})}
        )
    return cfg


def step_inputs(
    args: argparse.Namespace, cfg: FederationConfig, models: Models
) -> tuple[Data, Clients, str, int]:
    """(data, client models, lambda strategy, public size): digits with one real round of
    local training, or synthetic CIFAR-shaped tensors and random models at paper scale."""
    if args.paper_scale:
        n_public = args.public_size or cfg.data.public_size or 50000
        fake = SyntheticData(n_public, args.val_size or cfg.data.validation_size or 500, 10, 0)
        return fake, synthetic_clients(cfg, models, fake, args.clients), "heuristic", n_public
    data = build_federation_data(cfg, 0)
    return data, client_models(cfg, data, models), "search", len(data.public_x)


def is_shrunk(args: argparse.Namespace) -> bool:
    """A paper-scale run with any of its sizes changed."""
    sizes = (
        args.public_size,
        args.val_size,
        args.epochs,
        args.steps,
        args.batch_size,
        args.clients,
        args.candidates_per_exponent,
    )
    return args.paper_scale and any(v is not None for v in sizes)


def result_record(
    args: argparse.Namespace,
    cfg: FederationConfig,
    device: torch.device,
    models: Models,
    clients: Clients,
    lambdas: str,
    n_public: int,
    peak: float | None,
    rows: dict[str, dict],
) -> dict[str, object]:
    """The JSON record: the run's settings, the machine, and every variant's figures."""
    d = cfg.algorithm.distill
    settings = distill_settings(cfg.algorithm)
    return {
        "config": cfg.name,
        "mode": "paper-scale" if args.paper_scale else "digits",
        "synthetic_inputs": bool(args.paper_scale),
        "shrunk": bool(is_shrunk(args)),
        "argv": " ".join(["python", "benchmarks/server_step.py", *sys.argv[1:]]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "models": {p.name: models[p.name].builder for p in cfg.prototypes},
        "clients_per_prototype": {k: len(v) for k, v in clients.items()},
        "public_size": n_public,
        "distill_epochs": d.epochs,
        "distill_steps_per_distillation": settings.total_steps(n_public),
        "batch_size": d.batch_size,
        "precision": d.precision,
        "compile": d.compile,
        "lambda_candidates_per_student": (
            3 * cfg.algorithm.lambdas.candidates_per_exponent + 1
            if lambdas == "heuristic"
            else cfg.algorithm.lambdas.search_candidates + 4
        ),
        "bf16_peak_tflops": peak,
        "memory": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "peak RSS (5 ms sampling)",
        "variants": rows,
        "median_s": {k: r["median_s"] for k, r in rows.items()},
    }


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cfg = configure(args)
    models = prototype_models(cfg)
    data, clients, lambdas, n_public = step_inputs(args, cfg, models)
    fns = variant_fns(cfg, clients, models, data, device, lambdas)
    if args.variants:
        keep = args.variants.split(",")
        fns = {k: v for k, v in fns.items() if k in keep}
    peak = bf16_peak_tflops(device, args.peak_tflops)
    rows = measure(
        fns, student_images(cfg, n_public), args.repeats, device, peak, not args.no_flops
    )
    scale = "paper-scale, SYNTHETIC inputs (timing only)" if args.paper_scale else cfg.name
    title = (
        f"one server step, {scale}{' SHRUNK' if is_shrunk(args) else ''}, {device} "
        f"({args.threads} threads), median of {args.repeats}"
    )
    print_table(title, rows, device)
    if peak is None:
        print("device bf16 peak unknown (give --peak-tflops): achieved GFLOP/s only")
    record = result_record(args, cfg, device, models, clients, lambdas, n_public, peak, rows)
    default = "server_step_paper.json" if args.paper_scale else "server_step.json"
    out = Path(args.out or f"benchmarks/results/{default}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
