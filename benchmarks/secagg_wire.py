"""What secure aggregation costs on the wire: plain rounds against SecAgg+ rounds over a
real Mosquitto, at 10, 50 and 200 agents per prototype, with 0, 10 and 30 % dropouts.

    python benchmarks/secagg_wire.py [--agents 10,50,200] [--drops 0,0.1,0.3] [--rounds 2]
        [--width 184] [--json benchmarks/results/secagg_wire.json]

Each configuration is one federation of ``benchmarks/agents_scale.py`` (provisioned
registry and Mosquitto, the coordinator's ``MqttTransport`` + ``RoundEngine`` in one
process, the agents as real ``AgentLink`` clients in worker processes; the agents do
not train: each answers with the global state plus a small deterministic perturbation).
One prototype of N agents, all sampled every round, model ``mlp_digits`` of width 184
(13,810 parameters, about the digits M tier's 13,852); the plain rounds use the
profile's update compression (``android-phone``: int8), the secure rounds a masked
input of 32-bit words. Dropping agents send their keys and shares and then nothing:
the costliest dropout for the coordinator (their pairwise masks must be recovered from
their neighbours' shares). The secure rounds' later stages close after 5 s without
the dropouts (``privacy.secagg.stage_timeout_s``; 60 s by default).

Reported per configuration: the median round (wall, from the tasks going out to the
new global announced), the coordinator's CPU per agent and round, and the MQTT payload
bytes an agent sent and received per round (all messages: task, global model, update or
masked input, the secure stages' messages, acks), and whether every secure sum came out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.agents_scale import ScaleOptions, measure

RESULTS = Path(__file__).resolve().parent / "results" / "secagg_wire.json"
STAGE_TIMEOUT_S = 5.0


def configurations(agents: list[int], drops: list[float]) -> list[tuple[int, str, float]]:
    """(agents, mode, drop fraction): a plain run, then a secure run per drop fraction."""
    return [
        (n, mode, d)
        for n in agents
        for mode, d in [("plain", 0.0)] + [("secagg", x) for x in drops]
    ]


def one(n: int, mode: str, drop: float, rounds: int, width: int) -> dict[str, Any]:
    privacy = None
    if mode == "secagg":
        privacy = {"mode": "secagg", "secagg": {"stage_timeout_s": STAGE_TIMEOUT_S}}
    opts = ScaleOptions(
        rounds=rounds,
        width=width,
        tracemalloc=False,
        privacy=privacy,
        drop_fraction=drop,
        restart=False,
        agents_per_worker=100,
    )
    rec = measure(n, opts, report=lambda line: print(f"  {line}", flush=True))
    counters = rec.get("agent_counters") or {}
    done = max(1, len(rec.get("rounds") or []))
    row = {
        "agents": n,
        "mode": mode,
        "drop_fraction": drop,
        "dropped": round(drop * n),
        "round_s": rec.get("round_s_median"),
        "cpu_ms_per_agent": rec.get("cpu_ms_per_agent"),
        "sent_per_agent_round": counters.get("mqtt_bytes_sent", 0) / n / done,
        "received_per_agent_round": counters.get("mqtt_bytes_received", 0) / n / done,
        "parameters": rec.get("parameters"),
        "update_blob_bytes": rec.get("update_blob_bytes"),
        "in_sum": [r.get("received") for r in rec.get("rounds") or []],
        "failures": [
            r.get("kept_previous") for r in rec.get("rounds") or [] if r.get("kept_previous")
        ],
        "error": rec.get("error"),
    }
    return row | {"record": rec}


def table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="secure aggregation on the wire (per agent and round)")
    for col in (
        "agents",
        "mode",
        "dropouts",
        "round s",
        "coord CPU ms/agent",
        "sent kB",
        "received kB",
        "in the sum",
    ):
        t.add_column(col, justify="right")
    for r in rows:
        result = ", ".join(str(x) for x in r["in_sum"])
        if r["failures"]:
            result += " (" + "; ".join(str(f) for f in r["failures"])[:80] + ")"
        if r["error"]:
            result = f"error: {r['error'][:80]}"
        t.add_row(
            str(r["agents"]),
            r["mode"],
            f"{r['dropped']} ({r['drop_fraction']:.0%})" if r["mode"] == "secagg" else "-",
            f"{r['round_s']:.2f}" if r["round_s"] is not None else "-",
            f"{r['cpu_ms_per_agent']:.1f}" if r["cpu_ms_per_agent"] is not None else "-",
            f"{r['sent_per_agent_round'] / 1000:.1f}",
            f"{r['received_per_agent_round'] / 1000:.1f}",
            result,
        )
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", default="10,50,200")
    ap.add_argument("--drops", default="0,0.1,0.3")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--width", type=int, default=184)
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    agents = [int(x) for x in args.agents.split(",")]
    drops = [float(x) for x in args.drops.split(",")]
    rows = []
    for n, mode, drop in configurations(agents, drops):
        print(f"{n} agents, {mode}, {drop:.0%} dropouts", flush=True)
        rows.append(one(n, mode, drop, args.rounds, args.width))
    Console(width=160).print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"rows": rows, "stage_timeout_s": STAGE_TIMEOUT_S}, indent=1, default=str)
            + "\n"
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
