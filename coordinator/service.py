"""A federation run with a run directory: the engine plus persistence and resume.

Used by ``takfl-coordinator serve`` (MQTT agents) and testable with the
in-process transport. State is saved after every round; accepted updates of
the open round are saved as they arrive, so ``--resume`` after a crash
continues the open round without asking those clients again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from coordinator.engine import RoundEngine, RoundPolicy, RoundResult
from coordinator.inputs import prototype_models, server_data
from coordinator.observe import FleetObserver
from coordinator.simulate import metrics_line
from coordinator.store import RunStore, RunStoreError
from coordinator.transport.base import Transport
from takfl.checkpoint import CheckpointMeta
from takfl.config import FederationConfig
from takfl.federation_data import FederationData

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    rounds: int
    seed: int = 0
    resume: bool = False
    policy: RoundPolicy = field(default_factory=RoundPolicy)


def checkpoint_meta(
    cfg: FederationConfig,
    data: FederationData,
    models: dict[str, Any],
    prototype: str,
    round_id: int,
) -> CheckpointMeta:
    spec = models[prototype]
    return CheckpointMeta(
        prototype,
        round_id,
        spec.builder,
        data.num_classes,
        data.input_shape,
        dict(spec.args),
        list(data.pool.class_names),
        list(data.pool.mean),
        list(data.pool.std),
    )


class FederationRun:
    """Owns the engine and the run directory for one federation."""

    def __init__(
        self,
        cfg: FederationConfig,
        data: FederationData,
        transport: Transport,
        store: RunStore,
        device: torch.device,
        options: ServeOptions,
        on_round: Callable[[RoundResult], None] | None = None,
        on_phase: Callable[[str, int], None] | None = None,
        observer: FleetObserver | None = None,
    ) -> None:
        self.cfg, self.data, self.store, self.options = cfg, data, store, options
        self.models = prototype_models(cfg)
        self.engine = RoundEngine(
            cfg,
            self.models,
            server_data(data, device),
            transport,
            device=device,
            seed=options.seed,
            policy=options.policy,
            on_update=store.save_pending,
        )
        self.on_round = on_round
        self.observer = observer or FleetObserver()
        self.on_phase = on_phase or (lambda phase, r: None)
        self.completed = 0
        self.state: dict[str, Any] = {}

    def _prepare(self) -> None:
        if self.options.resume and self.store.exists():
            self.state = self.store.read_state()
            self.completed = int(self.state["round"])
            if self.completed > 0:
                for p in self.cfg.prototypes:
                    self.engine.globals[p.name] = self.store.load_global(p.name, self.completed)
            log.info("resuming after round %d", self.completed)
            return
        if self.store.exists() and not self.options.resume:
            raise RunStoreError(
                f"{self.store.root} already holds a run; pass --resume to "
                "continue it or choose another --run-dir"
            )
        self.store.root.mkdir(parents=True, exist_ok=True)
        self.store.write_config(self.cfg)
        for p in self.cfg.prototypes:
            meta = checkpoint_meta(self.cfg, self.data, self.models, p.name, 0)
            self.store.save_global(meta, self.engine.globals[p.name])
        self.state = {
            "round": 0,
            "phase": "starting",
            "config": self.cfg.name,
            "algorithm": self.engine.algorithm,
            "seed": self.options.seed,
            "accuracy": {},
            "lambdas": {},
            "open_round": None,
        }
        self.store.write_state(self.state)

    def _save_state(self, **changes: Any) -> None:
        self.state.update(changes, updated=time.time())
        self.store.write_state(self.state)

    def run(self) -> list[RoundResult]:
        self._prepare()
        results = []
        for r in range(self.completed + 1, self.options.rounds + 1):
            open_round = self.state.get("open_round")
            plan = open_round["plan"] if open_round and open_round.get("id") == r else None
            if plan is None:
                plan = self.engine.plan(r)
            resumed = self.store.pending(r)
            self._save_state(phase="collecting", open_round={"id": r, "plan": plan})
            self.on_phase("collecting", r)
            self.observer.round_started(r, plan)
            started = time.monotonic()
            res = self.engine.run_round(r, resumed=resumed, plan=plan)
            for name, state in self.engine.globals.items():
                self.store.save_global(
                    checkpoint_meta(self.cfg, self.data, self.models, name, r), state
                )
            self.store.append_metrics(metrics_line(self.engine.algorithm, self.options.seed, res))
            self._save_state(
                round=r,
                phase="round complete",
                open_round=None,
                accuracy=res.accuracy,
                lambdas=res.lambdas,
            )
            self.store.clear_pending(r)
            self.observer.round_finished(r, time.monotonic() - started)
            results.append(res)
            if self.on_round is not None:
                self.on_round(res)
        self._save_state(phase="finished")
        return results
