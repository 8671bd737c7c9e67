"""``takfl-coordinator simulate``: algorithms x seeds on identical partitions, in process."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.engine import RoundEngine, RoundResult
from coordinator.inputs import prototype_models, server_data
from coordinator.privacy import build_privacy
from coordinator.transport.base import ClientUpdate, Transport
from coordinator.transport.inprocess import InProcessTransport, VirtualClient
from coordinator.transport.secure_inprocess import SecureInProcess
from takfl.algorithms import Algorithm
from takfl.config import FederationConfig, prototype_profile, prototype_training
from takfl.config.base import ModelSpec
from takfl.federation_data import build_federation_data
from takfl.privacy.modes import privacy_mode
from takfl.run_layout import METRICS_FILE, PLOT_FILE, RESULTS_FILE
from takfl.wire.codec_names import CodecNameError
from takfl.wire.codecs import Codec, resolve_codec

PROFILE = "profile"  # the compression choice: each device profile's own codec


@dataclass(kw_only=True)
class SimulationSpec:
    algorithms: list[Algorithm]  # resolved at the entry point, run in this order
    seeds: int = 1
    first_seed: int = 0  # seeds run are first_seed .. first_seed + seeds - 1
    rounds: int | None = None  # None: the config's
    alpha: float | None = None  # None: the config's
    # apply a wire codec to updates: a codec choice ("fp16", "topk-int8:density=0.02",
    # ...; see takfl.wire.codec_names), one per prototype ("S=sign1:density=0.6;M=...")
    # or "profile" (each device profile's own)
    compression: str | None = None
    # send each client its global as a codec's delta against the model it holds (the
    # same forms as ``compression``; None: the full model every round)
    downstream: str | None = None
    data_dir: str | None = None
    # train a prototype's sampled clients together (vmap) where that equals the loop:
    # True, False, or None (automatic: on accelerators, and for small models on a CPU)
    vectorise: bool | None = None


def resolve_compression(
    cfg: FederationConfig, choice: str | None, *, downstream: bool = False
) -> dict[str, Codec] | None:
    """Prototype -> the codec its updates (``downstream``: its globals) go through:
    ``choice`` for every prototype; ``profile``: each prototype's device-profile choice
    (``comms.compression``, ``comms.downstream``), as real agents have it; or one choice
    per prototype, ``S=sign1:density=0.6;M=sign1;L=fp16`` (every prototype named).

    Raises:
        CodecNameError (a ValueError): an unknown codec, a bad setting, or a per-prototype
            choice that misses or repeats a prototype or names an unknown one.
    """
    if choice is None:
        return None
    names = [p.name for p in cfg.prototypes]
    if choice == PROFILE:
        comms = {n: prototype_profile(cfg, n).comms for n in names}
        if downstream:
            return {n: resolve_codec(c.downstream) for n, c in comms.items() if c.downstream}
        return {n: resolve_codec(c.compression) for n, c in comms.items()}
    items = [i.strip() for i in choice.split(";") if i.strip()]
    heads = [i.partition("=")[0].strip() for i in items]
    if len(items) == 1 and heads[0] not in names:
        codec = resolve_codec(items[0])
        return dict.fromkeys(names, codec)
    if sorted(heads) != sorted(names):
        raise CodecNameError(
            f"a choice per prototype names each of {', '.join(names)} once "
            f"(PROTOTYPE=CODEC;...), got {', '.join(heads)}"
        )
    return {h: resolve_codec(i.partition("=")[2]) for h, i in zip(heads, items, strict=True)}


def fp32_bytes(
    models: dict[str, ModelSpec], num_classes: int, input_shape: tuple[int, int, int]
) -> dict[str, int]:
    """Prototype -> size of its model's delta as an fp32 blob (the reference for ratios)."""
    from takfl.models import build_model
    from takfl.wire.codec import encode_state

    return {
        name: len(
            encode_state(
                build_model(spec.builder, num_classes, input_shape, **spec.args).state_dict(),
                "fp32",
            )
        )
        for name, spec in models.items()
    }


class UploadTally:
    """Encoded update sizes of the round in progress, by prototype (an engine hook), and
    the sizes of what those clients were sent."""

    def __init__(self) -> None:
        self.sizes: dict[str, list[float]] = {}
        self.down: dict[str, list[tuple[float, bool]]] = {}  # (bytes, was the full model)

    def __call__(self, upd: ClientUpdate) -> None:
        m = upd.metrics
        if "upload_bytes" in m:
            self.sizes.setdefault(upd.prototype, []).append(m["upload_bytes"])
        if "download_bytes" in m:
            sent = (m["download_bytes"], bool(m.get("download_full", 1.0)))
            self.down.setdefault(upd.prototype, []).append(sent)

    def take(self) -> dict[str, float]:
        """Mean bytes per update per prototype since the last call; then start over."""
        out = {p: float(np.mean(v)) for p, v in self.sizes.items() if v}
        self.sizes = {}
        return out

    def take_down(self) -> dict[str, dict[str, float | None]]:
        """Per prototype since the last call: the mean bytes sent down per client, the
        mean over deltas alone (None: none) and how many got the full model."""
        out: dict[str, dict[str, float | None]] = {}
        for p, sent in self.down.items():
            deltas = [b for b, full in sent if not full]
            out[p] = {
                "download_bytes": float(np.mean([b for b, _ in sent])),
                "download_delta_bytes": float(np.mean(deltas)) if deltas else None,
                "download_full": float(sum(full for _, full in sent)),
            }
        self.down = {}
        return out


def metrics_line(
    algorithm: Algorithm,
    seed: int,
    res: RoundResult,
    upload: dict[str, float] | None = None,
    fp32: dict[str, int] | None = None,
    download: dict[str, dict[str, float | None]] | None = None,
) -> list[dict[str, Any]]:
    """One JSON-able record per prototype for a finished round; with a codec, the mean
    encoded update size, the mean size of what each client was sent and the fp32 size
    of the same model (its delta, its full global)."""
    strategy = algorithm.lambda_strategy
    return [
        {
            "algorithm": algorithm.name,
            "lambda_strategy": strategy.name if strategy is not None else None,
            "validation": algorithm.validation,
            "seed": seed,
            "round": res.round_id,
            "prototype": proto,
            "test_accuracy": acc,
            "lambdas": res.lambdas.get(proto),
            "clients": res.received.get(proto, 0),
            "sampled": res.sampled.get(proto, 0),
            "timings": res.timings,
            "info": res.info.get(proto, {}),
            "kept_previous": res.kept_previous.get(proto),  # why the new model was discarded
            # under a private mode: epsilon spent so far at delta, noise multiplier, bound
            **({"privacy": res.privacy[proto]} if proto in res.privacy else {}),
        }
        | (
            {"upload_bytes": upload.get(proto), "fp32_bytes": fp32.get(proto)}
            if upload is not None and fp32 is not None
            else {}
        )
        | (download.get(proto, {}) if download else {})
        for proto, acc in res.accuracy.items()
    ]


def summarise(final: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """algorithm -> prototype -> {mean, std, per_seed} of final test accuracy."""
    return {
        alg: {
            p: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v}
            for p, v in protos.items()
        }
        for alg, protos in final.items()
    }


def run_simulation(
    cfg: FederationConfig,
    spec: SimulationSpec,
    out_dir: Path,
    device: torch.device,
    on_round: Callable[[str, int, RoundResult], None] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Run every algorithm for every seed; write metrics, results and the plot to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = spec.rounds or cfg.rounds
    models = prototype_models(cfg)
    trainings = {p.name: prototype_training(cfg, p.name) for p in cfg.prototypes}
    names = [a.name for a in spec.algorithms]
    if len(set(names)) != len(names):
        raise ValueError(f"each algorithm may run once per simulation, got {names}")
    final: dict[str, dict[str, list[float]]] = {a: {} for a in names}
    curves: dict[str, dict[str, list[list[float]]]] = {a: {} for a in names}
    build_privacy(cfg, rounds=rounds)  # a budget the rounds would pass: refused before any work
    metrics_path = out_dir / METRICS_FILE
    metrics_path.write_text("")
    secure = privacy_mode(cfg.privacy.mode).secure_sum
    if secure and (spec.compression is not None or spec.downstream is not None):
        raise ValueError(
            "secagg sends each update as a masked fixed-point input, not through a codec: "
            "drop --compression and --downstream"
        )
    codecs = resolve_compression(cfg, spec.compression)
    downlinks = resolve_compression(cfg, spec.downstream, downstream=True)
    if downlinks is not None and codecs is None:  # sizes are reported against fp32
        codecs = resolve_compression(cfg, "fp32")
    fp32: dict[str, int] | None = None
    for seed in range(spec.first_seed, spec.first_seed + spec.seeds):
        data = build_federation_data(cfg, seed, spec.data_dir, spec.alpha)
        sdata = server_data(data, device)
        if codecs is not None and fp32 is None:
            fp32 = fp32_bytes(models, data.num_classes, data.input_shape)
        for algo in spec.algorithms:
            alg = algo.name
            clients = [
                VirtualClient(client_id=cid, prototype=proto, x=x, y=y, training=trainings[proto])
                for cid, (proto, x, y) in data.clients.items()
            ]
            transport: Transport = InProcessTransport(
                clients,
                num_classes=data.num_classes,
                input_shape=data.input_shape,
                device=device,
                codecs=codecs,
                downlinks=downlinks,
                vectorise=spec.vectorise,
            )
            if secure:
                transport = SecureInProcess(transport, cfg.privacy, noise_seed=seed)
            # seeded noise: reproducible figures (no protection against who knows the seed)
            privacy = build_privacy(cfg, rounds=rounds, noise_seed=seed)
            tally = UploadTally()
            engine = RoundEngine(
                cfg,
                models,
                sdata,
                transport,
                algorithm=algo,
                device=device,
                seed=seed,
                privacy=privacy,
                on_update=tally,
            )
            per_proto: dict[str, list[float]] = {p.name: [] for p in cfg.prototypes}
            for r in range(1, rounds + 1):
                res = engine.run_round(r)
                with metrics_path.open("a") as f:
                    upload = tally.take() if codecs is not None else None
                    download = tally.take_down() if codecs is not None else None
                    for rec in metrics_line(algo, seed, res, upload, fp32, download):
                        f.write(json.dumps(rec) + "\n")
                for p, a in res.accuracy.items():
                    per_proto[p].append(a)
                if on_round is not None:
                    on_round(alg, seed, res)
            for p, accs in per_proto.items():
                final[alg].setdefault(p, []).append(accs[-1])
                curves[alg].setdefault(p, []).append(accs)
    results = summarise(final)
    (out_dir / RESULTS_FILE).write_text(
        json.dumps(
            {
                "config": cfg.name,
                "rounds": rounds,
                "seeds": list(range(spec.first_seed, spec.first_seed + spec.seeds)),
                "compression": spec.compression,
                "privacy": cfg.privacy.model_dump(),
                "codecs": {p: str(c) for p, c in codecs.items()} if codecs else None,
                "downstream": {p: str(c) for p, c in downlinks.items()} if downlinks else None,
                "validation": {a.name: a.validation for a in spec.algorithms},
                "lambda_strategy": {
                    a.name: a.lambda_strategy.name for a in spec.algorithms if a.lambda_strategy
                },
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "results": results,
            },
            indent=2,
        )
    )
    plot_curves(curves, out_dir / PLOT_FILE, title=f"{cfg.name}: test accuracy per round")
    return results


def plot_curves(curves: dict[str, dict[str, list[list[float]]]], path: Path, title: str) -> None:
    """Accuracy against round, one panel per prototype, one line (mean over seeds) per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protos = list(next(iter(curves.values()), {}))  # config order; all algorithms share it
    fig, axes = plt.subplots(1, len(protos), figsize=(4.5 * len(protos), 3.6), squeeze=False)
    for ax, proto in zip(axes[0], protos, strict=True):
        for alg, by_proto in curves.items():
            runs = np.asarray(by_proto.get(proto, []))
            if runs.size == 0:
                continue
            mean = runs.mean(0)
            xs = np.arange(1, len(mean) + 1)
            ax.plot(xs, mean, label=alg)
            if len(runs) > 1:
                ax.fill_between(xs, runs.min(0), runs.max(0), alpha=0.15)
        ax.set_title(f"prototype {proto}")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
