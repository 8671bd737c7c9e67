"""Hostile agents in a real federation: what the coordinator and honest agents do.

    python benchmarks/poison_federation.py --attack poison [--rounds 2] [--out FILE]

Runs the small digits federation of the end-to-end tests (2 S, 2 M, 2 L clients,
everyone sampled, 10 distillation steps) as real processes over the embedded broker:
``takfl-coordinator serve``, honest ``takfl-agent run`` processes, and, per attack,
provisioned agents that lie with their own secrets (``benchmarks/poison_agent.py``):

- ``clean``: every agent honest;
- ``poison``: L-001 sends its delta x1000 and claims 50 x its samples (the issue's attack);
- ``poison-norm``: L-001 sends its delta x1000 with its true sample count;
- ``zero-samples``: S-001 claims 0 samples;
- ``poison-bias``: in round 4, L-001 puts the whole delta norm the intake allowed before
  per-tensor bounds (0.99 x 5 x the global's norm) on one class's classifier bias, with
  its true sample count (issue 19: extreme but finite logits); run with ``--rounds 4``;
- ``poison-row``: in round 4, L-001 raises one class's classifier row and bias by 2 x
  their norms in the global, inside every per-tensor bound (only validation-aware
  acceptance can tell); run with ``--rounds 4``.

Prints one row (coordinator exit code, rounds completed, per-prototype accuracy of the
last completed round, whether every checkpoint is finite, honest agents still up,
refusals) and appends it to ``--out`` (JSON list). Run it against another checkout with
``PYTHONPATH=that/checkout`` to compare before and after.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
# First, for benchmarks.poison_agent: an installed distribution may ship a top-level package of the
# same name (opacus does), and this checkout's must win.
sys.path.insert(0, str(REPO))

from benchmarks.poison_agent import start_poison_agent  # noqa: E402
from coordinator.testbed import federation, metrics, read_state  # noqa: E402

ATTACKS: dict[str, dict[str, tuple[int, list[str]]]] = {
    "clean": {},
    "poison": {"L-001": (1, ["1:1000:50", "2:1000:50", "3:1000:50"])},
    "poison-norm": {"L-001": (1, ["1:1000:1", "2:1000:1", "3:1000:1"])},
    "zero-samples": {"S-001": (1, ["1:1:0", "2:1:0", "3:1:0"])},
    "poison-bias": {"L-001": (1, ["4:0.99:1:bias"])},
    "poison-row": {"L-001": (1, ["4:2:1:row"])},
}
AGENTS = ("S-000", "S-001", "M-000", "M-001", "L-000", "L-001")


def run(attack: str, rounds: int) -> dict[str, object]:
    hostile = ATTACKS[attack]
    honest = [a for a in AGENTS if a not in hostile]
    with (
        tempfile.TemporaryDirectory() as tmp,
        federation(Path(tmp), "embedded", rounds=rounds, clients=(2, 2, 2)) as fed,
    ):
        for aid in honest:
            fed.start_agent(aid)
        for aid, (shard, lies) in hostile.items():
            start_poison_agent(fed, aid, shard, lies)
        start = time.monotonic()
        coord = fed.start_coordinator(
            "--deadline", "40", "--quorum", "0.5", "--max-wait", "120", "--wait-all", "300"
        )
        try:
            code = coord.wait(1200)
        except subprocess.TimeoutExpired:  # a hung coordinator is a result too
            code = None
        seconds = time.monotonic() - start
        time.sleep(3)  # let agents react to the last global model
        state = read_state(fed.run_dir)
        done = int(state.get("round", 0))
        records = metrics(fed.run_dir)
        acc = {m["prototype"]: m["test_accuracy"] for m in records if m["round"] == done}
        by_round: dict[int, dict[str, float]] = {}
        for m in records:
            by_round.setdefault(int(m["round"]), {})[m["prototype"]] = m["test_accuracy"]
        finite = all(
            bool(torch.isfinite(t).all())
            for path in (fed.run_dir / "models").glob("*/round-*.safetensors")
            for t in load_file(str(path)).values()
            if t.is_floating_point()
        )
        up = [a for a in honest if fed.procs[a].poll() is None]
        log = fed.log("coordinator-0")
        refused = re.findall(r"refused \{[^}]*\}", log)
        error = next((line for line in log.splitlines() if "rror" in line), "")
    return {
        "attack": attack,
        "coordinator_exit": code,
        "rounds_completed": done,
        "rounds": rounds,
        "accuracy": acc,
        "accuracy_by_round": by_round,
        "all_checkpoints_finite": finite,
        "honest_agents_up": f"{len(up)}/{len(honest)}",
        "refusals": refused[-1] if refused else "",
        "error": error.strip()[:200],
        "seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attack", choices=sorted(ATTACKS), required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--label", default="", help="e.g. before / after")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/poison_federation.json"))
    args = ap.parse_args()
    machine = f"{platform.machine()}, torch {torch.__version__}, Python {platform.python_version()}"
    row = run(args.attack, args.rounds) | {"label": args.label, "machine": machine}
    table = Table(title=f"{args.attack} ({args.label})")
    for key in (
        "coordinator_exit",
        "rounds_completed",
        "accuracy",
        "all_checkpoints_finite",
        "honest_agents_up",
        "refusals",
        "error",
    ):
        table.add_column(key)
    table.add_row(
        *[
            str(row[k])
            for k in (
                "coordinator_exit",
                "rounds_completed",
                "accuracy",
                "all_checkpoints_finite",
                "honest_agents_up",
                "refusals",
                "error",
            )
        ]
    )
    Console(width=200).print(table)
    rows = json.loads(args.out.read_text()) if args.out.is_file() else []
    rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
