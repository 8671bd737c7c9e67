"""Wall time of one TAKFL server step against FedDF and a naive reference-style loop.

    python benchmarks/server_step.py [--config digits] [--device cpu|cuda] [--repeats 3]

All three variants start from the same client models (one real round of local
training on the digits federation) and run the same distillation step counts
and the same number of merge candidates:

- takfl: teacher logits computed once per client model (inference mode) and
  averaged as they arrive; public set held as one tensor on the device; the
  m x m distillations; candidate merges scored through one scratch state with
  ``torch.func.functional_call``.
- feddf: the same aggregation, one averaged target, m distillations.
- naive: the structure of the public reference code: every distillation batch
  re-runs all of the teacher's client models (autograd on), batches are
  re-assembled from per-item tensors, and every candidate merge is scored on a
  deep copy of the model.

Prints a table and writes benchmarks/results/server_step.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from coordinator.engine import _Collector
from coordinator.inputs import pick_device, prototype_models
from takfl.config import load_federation, prototype_training
from takfl.distill import kd_loss
from takfl.federation_data import build_federation_data
from takfl.models import build_model
from takfl.robust import make_aggregator
from takfl.server import EvalData, PrototypeInput, server_step
from takfl.task_arithmetic import merge, simplex_candidates, task_vector
from takfl.training import predict_logits, train_local

State = dict[str, torch.Tensor]


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
                p.name,
                scratch,
                col.fedavg.result(),
                col.logits.mean(),
                col.logits.count,
                col.client_logits,
            )
        )
    return protos


def naive_step(cfg, clients, models, data, device, seed: int) -> None:  # type: ignore[no-untyped-def]
    """TAKFL with the reference code's structure (same step and candidate counts)."""
    d = cfg.algorithm.distill
    lam_spec = cfg.algorithm.lambdas
    items = [data.public_x[i] for i in range(len(data.public_x))]  # per-item "dataset"
    val_x, val_y = data.val_x.to(device), data.val_y.to(device)
    teachers: dict[str, list[torch.nn.Module]] = {}
    avgs: dict[str, State] = {}
    for p in cfg.prototypes:
        spec = models[p.name]
        teachers[p.name] = []
        for state, _ in clients[p.name]:
            m = build_model(spec.builder, data.num_classes, data.input_shape, **spec.args)
            m.load_state_dict(state)
            teachers[p.name].append(m.to(device))
        from takfl.fedavg import fedavg

        avgs[p.name] = fedavg(
            [s for s, _ in clients[p.name]], [float(n) for _, n in clients[p.name]]
        )
    for j, student in enumerate(cfg.prototypes):
        spec = models[student.name]
        base_model = build_model(spec.builder, data.num_classes, data.input_shape, **spec.args)
        base_model.load_state_dict(avgs[student.name])
        vectors = []
        for teacher in cfg.prototypes:
            model = copy.deepcopy(base_model).to(device).train()
            opt = torch.optim.Adam(model.parameters(), lr=d.learning_rate)
            gen = torch.Generator().manual_seed(seed * 1000 + j)
            for _ in range(d.steps):
                idx = torch.randint(0, len(items), (d.batch_size,), generator=gen)
                x = torch.stack([items[int(i)] for i in idx]).to(device)
                z = torch.stack([t(x) for t in teachers[teacher.name]]).mean(0)  # grad on
                loss = kd_loss(model(x), z.detach(), d.temperature)
                opt.zero_grad()
                loss.backward()
                opt.step()
            vectors.append(
                task_vector({k: v.cpu() for k, v in model.state_dict().items()}, avgs[student.name])
            )
        best = -1.0
        for scale in lam_spec.scale_grid:
            for lam in simplex_candidates(len(vectors), lam_spec.search_candidates, seed):
                cand = copy.deepcopy(base_model)
                cand.load_state_dict(merge(avgs[student.name], vectors, lam, scale))
                cand.to(device).eval()
                with torch.no_grad():
                    out = cand(val_x)
                    acc = float((out.argmax(1) == val_y).float().mean())
                    F.cross_entropy(out, val_y)
                best = max(best, acc)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="digits")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/server_step.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cfg = load_federation(args.config)
    models = prototype_models(cfg)
    data = build_federation_data(cfg, 0)
    clients = client_models(cfg, data, models)
    ev = EvalData(data.public_x.to(device), data.val_x.to(device), data.val_y.to(device))

    def ours(algorithm: str):  # type: ignore[no-untyped-def]
        def run() -> None:
            protos = aggregate(cfg, clients, models, data, device, algorithm == "fedet")
            server_step(protos, ev, cfg.algorithm, algorithm, seed=0)

        return run

    rows = {
        "takfl": timed(ours("takfl"), args.repeats, device),
        "feddf": timed(ours("feddf"), args.repeats, device),
        "naive-takfl": timed(
            lambda: naive_step(cfg, clients, models, data, device, 0), args.repeats, device
        ),
    }
    med = {k: statistics.median(v) for k, v in rows.items()}
    table = Table(
        title=f"one server step, {cfg.name}, {device} ({args.threads} threads), "
        f"median of {args.repeats}"
    )
    for col in ("variant", "median s", "min s", "vs takfl"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for k, v in rows.items():
        table.add_row(k, f"{med[k]:.2f}", f"{min(v):.2f}", f"{med[k] / med['takfl']:.2f}x")
    Console().print(table)
    d = cfg.algorithm.distill
    record = {
        "config": cfg.name,
        "device": str(device),
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "distill_steps": d.steps,
        "batch_size": d.batch_size,
        "candidates_per_student": (cfg.algorithm.lambdas.search_candidates + 4)
        * len([s for s in cfg.algorithm.lambdas.scale_grid if s > 0])
        + 1,
        "seconds": rows,
        "median_s": med,
        "naive_over_takfl": med["naive-takfl"] / med["takfl"],
        "takfl_over_feddf": med["takfl"] / med["feddf"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(
        f"naive/takfl = {record['naive_over_takfl']:.2f}x, "
        f"takfl/feddf = {record['takfl_over_feddf']:.2f}x; wrote {out}"
    )


if __name__ == "__main__":
    main()
