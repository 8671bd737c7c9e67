"""What secure aggregation costs per round, in process: the SecAgg+ maths alone.

    python benchmarks/secagg_cost.py [--length 13852] [--clients 10,50,200]
        [--dropouts 0,0.1,0.3] [--json benchmarks/results/secagg_maths.json]

For each number of clients per prototype and each dropout fraction (clients that
stop after sharing their keys, before their masked input: the case that costs the
server most), one round of :func:`takfl.secagg.inprocess.run_round` on random
clipped updates of ``--length`` coordinates (default: the digits M tier's model,
13,852 values). The graph is full (SecAgg) up to 10 clients and a Harary graph of
degree 2 ceil(log2 n) (SecAgg+) beyond; the threshold is ceil((k + 1) / 2) of each
client's k neighbours plus itself. Reported: the payload bytes each client sends and
receives against a plain fp32 and fp16 update of the same model, the client's mean
compute time over all stages, the server's time (routing, summing, unmasking) against
a plain float64 sum of the same updates, and whether the round failed (and why).
Payloads only (no MQTT framing, headers or signatures): the protocol's cost on the
wire is measured separately once secagg runs over MQTT.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from takfl.secagg.client import SecAggClient, clip_vector
from takfl.secagg.inprocess import Dropouts, run_round
from takfl.secagg.messages import RoundParams, SecAggFailure


def graph_for(n: int) -> tuple[int, int]:
    """(neighbours k, threshold t) for ``n`` clients."""
    k = n - 1 if n <= 10 else min(n - 1, 2 * math.ceil(math.log2(n)))
    return k, math.ceil((k + 1) / 2)


def timed_round(
    params: RoundParams, updates: dict[str, np.ndarray], drop: Dropouts
) -> dict[str, Any]:
    """One round with the clients' and the server's compute timed apart."""
    client_time = 0.0
    originals = {
        name: getattr(SecAggClient, name) for name in ("advertise", "share", "mask", "unmask")
    }

    def timing(fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            nonlocal client_time
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                client_time += time.perf_counter() - t0

        return wrapped

    for name, fn in originals.items():
        setattr(SecAggClient, name, timing(fn))
    start = time.perf_counter()
    try:
        total, trace = run_round(params, updates, drop)
        failure = None
    except SecAggFailure as e:
        total, trace, failure = None, None, e.reason.value
    finally:
        for name, fn in originals.items():
            setattr(SecAggClient, name, fn)
    wall = time.perf_counter() - start
    n = len(params.clients)
    row: dict[str, Any] = {"failure": failure, "client_s_mean": client_time / n}
    row["server_s"] = wall - client_time
    if trace is not None and total is not None:
        stayed = n - len(drop.before_input)
        per = {"keys": n, "shares": n, "input": stayed, "unmasking": stayed}
        # a client that took part in every stage
        row["upload_bytes_per_client"] = sum(b / per[s] for s, b in trace.upload.items())
        row["download_bytes_per_client"] = sum(b / per[s] for s, b in trace.download.items())
        row["upload_by_stage"] = trace.upload
        row["download_by_stage"] = trace.download
        survivors = [c for c in params.clients if c not in drop.before_input]
        exact = np.sum([updates[c] for c in survivors], axis=0)
        row["max_abs_error"] = float(np.abs(total - exact).max())
        row["error_bound"] = params.encoding.max_error(n)
    return row


def plain_sum_s(updates: dict[str, np.ndarray]) -> float:
    t0 = time.perf_counter()
    total = np.zeros_like(next(iter(updates.values())))
    for u in updates.values():
        total += u
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=13_852)
    ap.add_argument("--clients", default="10,50,200")
    ap.add_argument("--dropouts", default="0,0.1,0.3")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/secagg_maths.json"))
    args = ap.parse_args()
    rows = []
    for n in [int(x) for x in args.clients.split(",")]:
        k, t = graph_for(n)
        for frac in [float(x) for x in args.dropouts.split(",")]:
            names = tuple(f"agent-{i:04d}" for i in range(n))
            params = RoundParams(
                context=f"bench|{n}|{frac}".encode(),
                clients=names,
                neighbours=k,
                threshold=t,
                bound=1.0,
                length=args.length,
            )
            rng = np.random.default_rng(n)
            updates = {c: clip_vector(rng.normal(size=args.length), 1.0) for c in names}
            gone = frozenset(rng.choice(names, size=round(frac * n), replace=False).tolist())
            row = {"clients": n, "neighbours": k, "threshold": t, "dropouts": len(gone)}
            row |= timed_round(params, updates, Dropouts(before_input=gone))
            row["plain_fp32_bytes"] = 4 * args.length
            row["plain_fp16_bytes"] = 2 * args.length
            row["plain_sum_s"] = plain_sum_s(updates)
            rows.append(row)
            up = row.get("upload_bytes_per_client", float("nan"))
            client_ms = row["client_s_mean"] * 1e3
            print(
                f"n={n:4d} k={k:3d} t={t:3d} drop={len(gone):3d}  up/client {up / 1e3:8.1f} kB "
                f"(fp32 {4 * args.length / 1e3:.1f} kB)  client {client_ms:7.1f} ms"
                f"  server {row['server_s']:7.2f} s  failure {row['failure']}",
                flush=True,
            )
    out = {
        "what": "SecAgg+ maths in process, payload bytes only (takfl.secagg.inprocess)",
        "length": args.length,
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
