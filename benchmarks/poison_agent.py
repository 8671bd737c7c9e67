"""A provisioned agent turned hostile, using only its own secret: it registers honestly,
trains honestly, then sends a poisoned delta and may claim more samples than it has.

    python -m benchmarks.poison_agent --broker URL --id L-001 --secret-file F --federation CFG
        --shard 1 [--lie ROUND:SCALE:CLAIM[:MODE] ...]

Per task of round r: ``--lie ROUND:SCALE:CLAIM[:MODE]`` (repeatable) sends, with
num_samples = CLAIM x its real count (CLAIM 0 sends 0 samples), the delta of MODE:

- ``scale`` (default): its trained delta times SCALE;
- ``bias``: nothing but one class's classifier bias, raised by SCALE x the whole norm the
  config's intake allowed before per-tensor bounds (``max_norm_factor x max(||global||,
  norm_floor)``): extreme but finite logits for that class;
- ``row``: that class's classifier row and bias, each raised by SCALE x its own tensor's
  norm in the global (the weight row along the all-ones direction, which post-ReLU
  features meet positively): inside per-tensor bounds for SCALE below their factor.

Rounds with no lie are answered honestly. Started as a real process in a local federation
by :func:`start_poison_agent`, for benchmarks/poison_federation.py and the end-to-end
poisoning test.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from coordinator.testbed import Federation
from edge_agent.data import load_demo_shard
from edge_agent.link import AgentIdentity, AgentLink
from takfl.config import load_federation, prototype_profile
from takfl.models import build_model
from takfl.mqtt.credentials import mqtt_password
from takfl.mqtt.url import parse_broker_url
from takfl.secret_files import load_secret_file
from takfl.state import State
from takfl.training import train_local
from takfl.wire.validation import delta_norm

POISONED_CLASS = 3


def classifier_keys(state: dict[str, torch.Tensor], num_classes: int) -> tuple[str, str]:
    """(weight, bias) names of the last layer: the last ``.bias`` of ``num_classes``
    entries and its ``.weight``."""
    bias = [k for k, v in state.items() if k.endswith(".bias") and v.shape == (num_classes,)][-1]
    return bias.removesuffix(".bias") + ".weight", bias


@dataclass(frozen=True, kw_only=True)
class Lie:
    """What the attacker knows when it lies: the round's global, its honestly trained
    weights, the number of classes and the whole-delta norm the intake allowed before
    per-tensor bounds."""

    base: State
    trained: State
    num_classes: int
    allowed: float


def scaled_delta(lie: Lie, scale: float) -> State:
    """Its trained delta times ``scale``."""
    b = lie.base
    return {
        k: b[k] + scale * (v - b[k]) if v.is_floating_point() else v for k, v in lie.trained.items()
    }


def bias_delta(lie: Lie, scale: float) -> State:
    """The global with one class's classifier bias raised by ``scale x`` the allowed norm."""
    _, b = classifier_keys(lie.base, lie.num_classes)
    bias = lie.base[b].clone()
    bias[POISONED_CLASS] += scale * lie.allowed
    return {**lie.base, b: bias}


def row_delta(lie: Lie, scale: float) -> State:
    """The global with one class's classifier row (along all-ones) and bias each raised
    by ``scale x`` its tensor's norm."""
    w, b = classifier_keys(lie.base, lie.num_classes)
    bias, weight = lie.base[b].clone(), lie.base[w].clone()
    bias[POISONED_CLASS] += scale * float(lie.base[b].norm())
    ones = torch.ones_like(weight[POISONED_CLASS])
    weight[POISONED_CLASS] += scale * float(lie.base[w].norm()) * ones / float(ones.norm())
    return {**lie.base, b: bias, w: weight}


LIES: dict[str, Callable[[Lie, float], State]] = {
    "scale": scaled_delta,
    "bias": bias_delta,
    "row": row_delta,
}


def parse_lie(spec: str) -> tuple[int, float, float, Callable[[Lie, float], State]]:
    """``ROUND:SCALE:CLAIM[:MODE]`` -> (round, scale, claim, the mode's function)."""
    r, scale, claim, *mode = spec.split(":")
    name = mode[0] if mode else "scale"
    if name not in LIES:
        raise SystemExit(f"unknown lie mode {name!r}; known: {', '.join(LIES)}")
    return int(r), float(scale), float(claim), LIES[name]


def start_poison_agent(
    fed: Federation, agent_id: str, shard: int, lies: Sequence[str]
) -> subprocess.Popen[bytes]:
    """A provisioned agent of ``fed`` that lies: each of ``lies`` is
    ``ROUND:SCALE:CLAIM[:MODE]`` (see the module docstring)."""
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
    ap.add_argument("--lie", action="append", default=[], help="ROUND:SCALE:CLAIM[:MODE]")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(1)

    lies = {}
    for spec in args.lie:
        r, scale, claim, lie_fn = parse_lie(spec)
        lies[r] = (scale, claim, lie_fn)
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
            scale, claim, lie_fn = lies.get(msg.round_id, (1.0, 1.0, scaled_delta))
            base = task.global_state
            allowed = cfg.intake.max_norm_factor * max(delta_norm(base), cfg.intake.norm_floor)
            lie = Lie(base=base, trained=result.state, num_classes=msg.num_classes, allowed=allowed)
            sent = lie_fn(lie, scale)
            n = int(claim * result.num_samples)
            header = link.send_update(task, sent, num_samples=n)
            print(
                f"round {msg.round_id}: sent a {lie_fn.__name__} x{scale:g} claiming {n} samples "
                f"({result.num_samples} real)",
                flush=True,
            )
            ack = link.wait_ack(header.blob.digest, timeout=120)
            print(f"round {msg.round_id}: coordinator answered {ack}", flush=True)
            time.sleep(0.1)


if __name__ == "__main__":
    main()
