"""A federation run with a run directory: the engine plus persistence and resume.

Used by ``takfl-coordinator serve`` (MQTT agents) and testable with the
in-process transport. State is saved after every round; accepted updates of
the open round are saved as they arrive, so ``--resume`` after a crash
continues the open round without asking those clients again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from coordinator.engine import RoundEngine, RoundPolicy, RoundResult
from coordinator.inputs import prototype_models, server_data
from coordinator.observe import FleetObserver
from coordinator.privacy import PrivacyBudgetExceeded, build_privacy
from coordinator.simulate import metrics_line
from coordinator.store import RunStore, RunStoreError
from coordinator.transport.base import ClientUpdate, Transport
from takfl.algorithms import resolve_algorithm
from takfl.checkpoint import CheckpointMeta
from takfl.config import FederationConfig
from takfl.federation_data import FederationData
from takfl.run_layout import RunState
from takfl.wire.validation import AgentRecord, UpdateBounds, check_stored_update

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ServeOptions:
    rounds: int
    seed: int = 0
    resume: bool = False
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    run_id: str = ""  # the run's id on the wire, kept in the state ("": none)


def checkpoint_meta(
    cfg: FederationConfig,
    data: FederationData,
    models: dict[str, Any],
    prototype: str,
    round_id: int,
) -> CheckpointMeta:
    spec = models[prototype]
    return CheckpointMeta(
        prototype=prototype,
        round=round_id,
        builder=spec.builder,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        builder_args=dict(spec.args),
        class_names=list(data.pool.class_names),
        mean=list(data.pool.mean),
        std=list(data.pool.std),
    )


def update_bounds(cfg: FederationConfig) -> UpdateBounds:
    """The config's bound on update norms, relative to each prototype's global model."""
    return UpdateBounds(norm_factor=cfg.intake.max_norm_factor, norm_floor=cfg.intake.norm_floor)


class FederationRun:
    """Owns the engine and the run directory for one federation.

    ``registry`` (agent id -> record; the live mapping of the transport, so allowances
    pinned at registration count) decides which planned agents may still take part and
    caps their weights; updates persisted before a restart are checked against it again.
    None (virtual clients) checks only their content.
    """

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
        registry: Mapping[str, AgentRecord] | None = None,
        observer: FleetObserver | None = None,
    ) -> None:
        self.cfg, self.data, self.store, self.options = cfg, data, store, options
        self.registry = registry
        self.bounds = update_bounds(cfg)
        self.models = prototype_models(cfg)
        # the budget over the whole run: refused here, before anything starts, if the
        # configured noise cannot last it; the noise comes from the OS's entropy
        self.privacy = build_privacy(cfg, rounds=options.rounds)
        self.engine = RoundEngine(
            cfg,
            self.models,
            server_data(data, device),
            transport,
            algorithm=resolve_algorithm(cfg.algorithm),
            device=device,
            seed=options.seed,
            policy=options.policy,
            on_update=store.save_pending,
            weight_cap=self._weight_cap,
            privacy=self.privacy,
        )
        self.on_round = on_round
        self.observer = observer or FleetObserver()
        self.on_phase = on_phase or (lambda phase, r: None)
        self.completed = 0
        self.prepared = False
        self.state: RunState = {"round": 0}

    def _weight_cap(self, client: str) -> int | None:
        record = self.registry.get(client) if self.registry is not None else None
        return record.max_samples if record is not None else None

    def prepare(self) -> None:
        """Create the run directory, or load (and check) the one to resume; ``run`` calls
        it when the caller has not. Raises :class:`RunStoreError` on a bad run directory."""
        if self.prepared:
            return
        self._prepare()
        self.prepared = True

    def _prepare(self) -> None:
        if self.options.resume and self.store.exists():
            self.state = self.store.read_state()
            self.completed = self.state["round"]
            digests = self.state.get("checkpoints", {})
            if self.completed > 0:
                for p in self.cfg.prototypes:
                    self.engine.globals[p.name] = self.store.load_global(
                        p.name, self.completed, digests.get(p.name)
                    )
            self.privacy.load_state(self.state.get("privacy"))
            self.privacy.check_run(self.options.rounds - self.completed)
            records = self.state.get("round_metrics")
            if records is not None:
                # the round's metrics went with the state; a kill before (or during) the
                # metrics write is repaired here, and a repeat changes nothing
                self.store.commit_metrics(self.completed, records)
            if self.options.run_id and not self.state.get("run_id"):
                self.state["run_id"] = self.options.run_id  # a run from before run ids
                self.store.write_state(self.state)
            log.info("resuming after round %d", self.completed)
            return
        if self.store.exists() and not self.options.resume:
            raise RunStoreError(
                f"{self.store.root} already holds a run; pass --resume to "
                "continue it or choose another --run-dir"
            )
        self.store.root.mkdir(parents=True, exist_ok=True)
        self.store.write_config(self.cfg)
        digests = {}
        for p in self.cfg.prototypes:
            meta = checkpoint_meta(self.cfg, self.data, self.models, p.name, 0)
            digests[p.name] = self.store.save_global(meta, self.engine.globals[p.name])
        self.state = {
            "round": 0,
            "run_id": self.options.run_id,
            "phase": "starting",
            "config": self.cfg.name,
            "algorithm": self.engine.algorithm.name,
            "seed": self.options.seed,
            "accuracy": {},
            "lambdas": {},
            "open_round": None,
            "checkpoints": digests,
        }
        if self.privacy.budgets:
            self.state["privacy"] = self.privacy.to_state()
        self.store.write_state(self.state)

    def _save_state(self) -> None:
        """Write ``self.state``, stamped with the time."""
        self.state["updated"] = time.time()
        self.store.write_state(self.state)

    def _known(self, plan: dict[str, list[str]]) -> dict[str, list[str]]:
        """The plan without agents that are no longer provisioned (or moved prototype)."""
        if self.registry is None:
            return plan
        out = {}
        for proto, ids in plan.items():
            keep = [a for a in ids if a in self.registry and self.registry[a].prototype == proto]
            for a in sorted(set(ids) - set(keep)):
                log.warning("leaving %s out of the round: no longer provisioned for %s", a, proto)
            out[proto] = keep
        return out

    def _resumed(self, round_id: int) -> list[ClientUpdate]:
        """Persisted updates of ``round_id`` that still validate; the others are skipped
        with their reason logged."""
        out = []
        for upd in self.store.pending(round_id):
            reference = self.engine.globals.get(upd.prototype)
            if reference is None:
                log.warning(
                    "skipping persisted update of %s: unknown prototype %r",
                    upd.client_id,
                    upd.prototype,
                )
                continue
            verdict = check_stored_update(
                upd.client_id,
                upd.prototype,
                upd.num_samples,
                upd.state,
                reference,
                self.registry,
                bounds=self.bounds,
            )
            if not verdict.accepted:
                log.warning(
                    "skipping persisted update of %s (round %d): %s",
                    upd.client_id,
                    round_id,
                    verdict,
                )
                continue
            out.append(upd)
        return out

    def run(self) -> list[RoundResult]:
        self.prepare()
        results: list[RoundResult] = []
        for r in range(self.completed + 1, self.options.rounds + 1):
            open_round = self.state.get("open_round")
            plan = open_round["plan"] if open_round and open_round.get("id") == r else None
            if plan is None:
                plan = self.engine.plan(r)
            plan = self._known(plan)
            resumed = self._resumed(r)
            self.state["phase"] = "collecting"
            self.state["open_round"] = {"id": r, "plan": plan}
            self._save_state()
            self.on_phase("collecting", r)
            self.observer.round_started(r, plan)
            started = time.monotonic()
            try:
                res = self.engine.run_round(r, resumed=resumed, plan=plan)
            except PrivacyBudgetExceeded as e:
                log.warning("%s", e)
                self.state["phase"] = "stopped: privacy budget"
                self.state["open_round"] = None
                self._save_state()
                self.store.clear_pending(r)
                return results
            digests = {
                name: self.store.save_global(
                    checkpoint_meta(self.cfg, self.data, self.models, name, r), state
                )
                for name, state in self.engine.globals.items()
            }
            records = metrics_line(self.engine.algorithm, self.options.seed, res)
            # the state is the commit point: it carries the checkpoints' digests and the
            # round's metrics, which metrics.jsonl then receives (again on resume if a
            # kill falls in between)
            self.state.update(
                {
                    "round": r,
                    "phase": "round complete",
                    "open_round": None,
                    "accuracy": res.accuracy,
                    "lambdas": res.lambdas,
                    "checkpoints": digests,
                    "round_metrics": records,
                }
            )
            if self.privacy.budgets:
                self.state["privacy"] = self.privacy.to_state()
            self._save_state()
            self.store.commit_metrics(r, records)
            self.store.clear_pending(r)
            self.observer.round_finished(r, time.monotonic() - started)
            if self.privacy.budgets:
                self.observer.privacy_spent(r, self.privacy.epsilons(), self.privacy.spec.delta)
            results.append(res)
            if self.on_round is not None:
                self.on_round(res)
        self.state["phase"] = "finished"
        self._save_state()
        return results
