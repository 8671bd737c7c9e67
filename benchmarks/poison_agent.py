"""A provisioned agent turned hostile, using only its own secret: it registers honestly,
trains honestly, then sends its delta scaled up and claims more samples than it has.

    python -m benchmarks.poison_agent --broker URL --id L-001 --secret-file F --federation CFG
        --shard 1 [--lie ROUND:SCALE:CLAIM ...]

Per task of round r: ``--lie ROUND:SCALE:CLAIM`` (repeatable) sends the delta times
SCALE with num_samples = CLAIM x its real count (CLAIM 0 sends 0 samples); rounds with
no lie are answered honestly. Started as a real process in a local federation by
:func:`start_poison_agent`, for benchmarks/poison_federation.py and the end-to-end
poisoning test.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import subprocess
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from coordinator.testbed import Federation
from edge_agent.data import load_demo_shard
from edge_agent.link import AgentIdentity, AgentLink
from takfl.config import load_federation, prototype_profile
from takfl.models import build_model
from takfl.mqtt.credentials import mqtt_password
from takfl.mqtt.url import parse_broker_url
from takfl.secret_files import load_secret_file
from takfl.training import train_local


def start_poison_agent(
    fed: Federation, agent_id: str, shard: int, lies: Sequence[str]
) -> subprocess.Popen[bytes]:
    """A provisioned agent of ``fed`` that lies: each of ``lies`` is ``ROUND:SCALE:CLAIM``
    (its delta times SCALE, CLAIM x its samples claimed in that round)."""
    return fed.start_module(
        agent_id,
        "benchmarks.poison_agent",
        *fed.agent_args(agent_id),
        *("--shard", str(shard)),
        *[arg for lie in lies for arg in ("--lie", lie)],
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--broker", required=True)
    ap.add_argument("--id", required=True)
    ap.add_argument("--secret-file", required=True)
    ap.add_argument("--federation", required=True)
    ap.add_argument("--shard", type=int, required=True)
    ap.add_argument("--lie", action="append", default=[], help="ROUND:SCALE:CLAIM")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(1)

    lies = {}
    for spec in args.lie:
        r, scale, claim = spec.split(":")
        lies[int(r)] = (float(scale), float(claim))
    cfg = load_federation(args.federation)
    proto = args.id.rpartition("-")[0]
    profile = prototype_profile(cfg, proto)
    _, x, y = load_demo_shard(args.federation, proto, args.shard)
    secret = load_secret_file(args.secret_file)
    settings = parse_broker_url(args.broker)
    if settings.username is None:
        settings = replace(settings, username=args.id, password=mqtt_password(secret))
    identity = AgentIdentity(
        agent_id=args.id,
        prototype=proto,
        secret=secret,
        profile=profile.name,
        hardware_class=profile.hardware_class,
        num_samples=len(x),
    )
    link = AgentLink(settings, cfg.name, identity)
    link.start(timeout=None)  # like takfl-agent run: wait for a broker that is not up yet
    with contextlib.closing(link):
        while True:
            task = link.next_task(timeout=1.0)
            if task is None:
                continue
            msg = task.message
            model = build_model(
                msg.model.builder, msg.num_classes, msg.input_shape, **msg.model.args
            )
            model.load_state_dict(task.global_state)
            spec = profile.training.with_dictated(msg.training)
            result = train_local(model, x, y, spec, seed=msg.seed)
            scale, claim = lies.get(msg.round_id, (1.0, 1.0))
            base = task.global_state
            sent = {
                k: base[k] + scale * (v - base[k]) if v.is_floating_point() else v
                for k, v in result.state.items()
            }
            n = int(claim * result.num_samples)
            header = link.send_update(task, sent, num_samples=n)
            print(
                f"round {msg.round_id}: sent delta x{scale:g} claiming {n} samples "
                f"({result.num_samples} real)",
                flush=True,
            )
            ack = link.wait_ack(header.blob.digest, timeout=120)
            print(f"round {msg.round_id}: coordinator answered {ack}", flush=True)
            time.sleep(0.1)


if __name__ == "__main__":
    main()
