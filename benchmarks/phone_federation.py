"""The S tier trained through ExecuTorch in a real federation, against torch.

    python benchmarks/phone_federation.py [--rounds 3]

Runs the small digits federation of the end-to-end tests (2 S, 2 M, 1 L agents, every
client every round, TAKFL) three ways on the same seed and partition:

1. deployed: Mosquitto, coordinator and agents as separate processes; the S agents use
   the android-phone profile, so they train through the ExecuTorch runtime (SGD);
2. simulated, S on torch with the same SGD settings (the engine's in-process transport);
3. simulated, S on torch with Adam (lr as the federation sets it), the phone tier's
   optimiser before it moved to ExecuTorch, which offers SGD only.

Prints each prototype's test accuracy per round and writes
benchmarks/results/phone_federation.json. Needs mosquitto and executorch.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.simulate import SimulationSpec, run_simulation
from coordinator.testbed import federation, metrics
from takfl.algorithms import resolve_algorithm
from takfl.config import load_federation, load_profile

RESULTS = Path(__file__).parent / "results" / "phone_federation.json"


def by_round(records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in records:
        out.setdefault(r["prototype"], {})[int(r["round"])] = float(r["test_accuracy"])
    return out


def simulate(cfg_path: Path, out: Path, rounds: int) -> dict[str, dict[int, float]]:
    torch.set_num_threads(1)
    cfg = load_federation(cfg_path)
    spec = SimulationSpec(
        algorithms=[resolve_algorithm(cfg.algorithm, "takfl")],
        seeds=1,
        rounds=rounds,
        compression="profile",
    )
    run_simulation(cfg, spec, out, torch.device("cpu"))
    return by_round(metrics(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, dict[str, dict[int, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        with federation(tmp_path, "mosquitto", rounds=args.rounds) as fed:
            fed.start_all_agents()
            coord = fed.start_coordinator("--deadline", "300", "--wait-all", "300")
            if coord.wait(3000) != 0:
                raise SystemExit(fed.logs())
            results["deployed, S through ExecuTorch (SGD)"] = by_round(metrics(fed.run_dir))
            cfg_path = fed.cfg_path
        results["simulated, S on torch (SGD)"] = simulate(cfg_path, tmp_path / "sgd", args.rounds)
        phone = load_profile("android-phone").model_dump(mode="json")
        phone["training"].update(backend="torch", optimizer="adam")
        adam_profile = tmp_path / "phone-adam.yaml"
        adam_profile.write_text(yaml.safe_dump(phone))
        cfg = yaml.safe_load(cfg_path.read_text())
        for proto in cfg["prototypes"]:
            if proto["name"] == "S":
                proto["profile"] = str(adam_profile)
        adam_cfg = tmp_path / "adam.yaml"
        adam_cfg.write_text(yaml.safe_dump(cfg))
        results["simulated, S on torch (Adam)"] = simulate(adam_cfg, tmp_path / "adam", args.rounds)
    table = Table(title=f"Small digits federation, TAKFL, {args.rounds} rounds: test accuracy %")
    table.add_column("run")
    table.add_column("prototype")
    for r in range(1, args.rounds + 1):
        table.add_column(f"round {r}")
    for run, protos in results.items():
        for proto, rounds in sorted(protos.items()):
            table.add_row(
                run,
                proto,
                *[f"{rounds.get(r, float('nan')):.1f}" for r in range(1, args.rounds + 1)],
            )
    Console(width=160).print(table)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "command": f"python benchmarks/phone_federation.py --rounds {args.rounds}",
                "machine": f"{platform.machine()}, torch {torch.__version__}",
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
