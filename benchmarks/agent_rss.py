"""Peak resident memory of an agent process through one round of the ``raspberry-pi-4``
profile: its model (resnet8, 10 classes, 3x32x32 inputs) trained at its batch size.

    python benchmarks/agent_rss.py [--profile raspberry-pi-4] [--samples 500]

Each measurement is a fresh child process that goes through a round's stages as the agent
does and reads its peak resident size (VmHWM) after each:

1. ``import edge_agent.runner`` (torch, paho-mqtt, safetensors, the wire format),
2. the global model received: an fp32 safetensors blob decoded (``decode_state``),
3. the model built and loaded with it,
4. local training (``train_local``) with the profile's training settings,
5. the update encoded as the profile says (delta against the global model).

The private data are ``--samples`` random images of the profile's input shape (a CIFAR-10
shard of 100 clients holds 500); memory does not depend on their values. Also measured: a
bare interpreter and one that only imports torch, to show what dominates. Prints a table
and writes ``benchmarks/results/agent_rss.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

_STAGES = r"""
import json, sys, time
def hwm():
    # peak resident size, and the current resident size split into anonymous memory (heap,
    # tensors) and file-backed pages (the mapped code of torch's shared libraries)
    v = {}
    for line in open("/proc/self/status"):
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile", "RssShmem"):
            v[key] = int(rest.split()[0]) / 1024
    return [v["VmHWM"], v["RssAnon"], v["RssFile"] + v.get("RssShmem", 0)]
marks = {"interpreter": hwm()}
if sys.argv[1] == "torch-only":
    import torch
    marks["import torch"] = hwm()
    print(json.dumps(marks)); sys.exit(0)
import edge_agent.runner
import torch
from takfl.config import load_profile
from takfl.models import build_model
from takfl.training import train_local
from takfl.wire.codec import decode_state, encode_state
marks["import edge_agent.runner"] = hwm()
prof = load_profile(sys.argv[2])
samples = int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))
shape = (3, 32, 32)
fresh = build_model(prof.model.builder, 10, shape, **prof.model.args)
blob = encode_state(fresh.state_dict(), "fp32")
global_state = decode_state(blob)
marks["global model received"] = hwm()
model = build_model(prof.model.builder, 10, shape, **prof.model.args)
model.load_state_dict(global_state)
marks["model built"] = hwm()
g = torch.Generator().manual_seed(0)
x = torch.rand(samples, *shape, generator=g)
y = torch.randint(0, 10, (samples,), generator=g)
start = time.perf_counter()
result = train_local(model, x, y, prof.training, seed=0)
train_s = time.perf_counter() - start
marks["trained"] = hwm()
delta = {k: v - global_state[k] for k, v in result.state.items() if v.is_floating_point()}
update = encode_state(delta, prof.comms.compression)
marks["update encoded"] = hwm()
print(json.dumps({**marks, "_train_s": train_s, "_steps": result.steps,
                  "_update_bytes": len(update), "_threads": torch.get_num_threads()}))
"""


def measure(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _STAGES, *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="raspberry-pi-4")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None, help="default: the profile's")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/agent_rss.json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    from takfl.config import load_profile

    prof = load_profile(args.profile)
    threads = args.threads or prof.training.threads
    bare = measure("torch-only")
    round_ = measure("round", args.profile, str(args.samples), str(threads))
    stages = {k: round(v[0], 1) for k, v in round_.items() if not k.startswith("_")}
    parts = {
        k: {"anon_mb": round(v[1], 1), "file_mb": round(v[2], 1)}
        for k, v in round_.items()
        if not k.startswith("_")
    }
    result = {
        "machine": f"{platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "profile": args.profile,
        "model": prof.model.builder,
        "batch_size": prof.training.batch_size,
        "epochs": prof.training.epochs,
        "samples": args.samples,
        "threads": int(round_["_threads"]),
        "peak_rss_mb_after": stages,
        "resident_now_after": parts,
        "interpreter_mb": round(bare["interpreter"][0], 1),
        "import_torch_only_mb": round(bare["import torch"][0], 1),
        "peak_rss_mb": max(stages.values()),
        "train_s": round(round_["_train_s"], 2),
        "steps": int(round_["_steps"]),
        "update_bytes": int(round_["_update_bytes"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.profile}: {prof.model.builder}, batch {prof.training.batch_size}, "
        f"{args.samples} samples, {result['threads']} threads ({result['machine']})"
    )
    print(f"{'stage':28} {'peak RSS MB':>12} {'now: anon MB':>13} {'file MB':>8}")
    print(f"{'python + import torch only':28} {result['import_torch_only_mb']:>12}")
    for stage, mb in stages.items():
        now = parts[stage]
        print(f"{stage:28} {mb:>12} {now['anon_mb']:>13} {now['file_mb']:>8}")
    print(
        f"trained {result['steps']} steps in {result['train_s']} s; "
        f"update {result['update_bytes']} bytes; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
