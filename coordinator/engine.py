"""The round engine: sampling, collection, streaming aggregation, server step, evaluation.

Transport-agnostic: the same engine drives virtual clients (simulation) and
real agents over MQTT.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from coordinator.influence import UpdateGuard
from coordinator.privacy import RunPrivacy, build_privacy
from coordinator.transport.base import ClientUpdate, SecureSum, Task, Transport
from takfl.algorithms import Algorithm, resolve_algorithm
from takfl.config import FederationConfig, prototype_training
from takfl.config.base import ModelSpec
from takfl.models import build_model
from takfl.privacy.central import ClippedSum
from takfl.privacy.modes import resolve_privacy
from takfl.robust import Aggregator, LogitsAccumulator, StateAccumulator, make_aggregator
from takfl.secagg.aggregate import SecureMean
from takfl.server import PrototypeInput, StepData, server_step
from takfl.state import State, non_finite_entry
from takfl.training import accuracy, predict_logits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundPolicy:
    deadline_s: float = 120.0  # a round closes this long after its tasks went out...
    quorum: float = 1.0  # ...once this fraction of each prototype's sampled clients replied
    max_wait_s: float = 600.0  # past the deadline, wait at most this long for a quorum


@dataclass(kw_only=True)
class ServerData:
    """Tensors on the compute device."""

    public_x: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]


@dataclass(kw_only=True)
class RoundResult:
    round_id: int
    accuracy: dict[str, float]  # prototype -> test accuracy, percent
    lambdas: dict[str, dict[str, float] | None]
    received: dict[str, int]  # prototype -> accepted updates
    sampled: dict[str, int]
    timings: dict[str, float]
    info: dict[str, dict[str, float]] = field(default_factory=dict)
    # prototype -> why its new model was discarded and the previous global kept
    kept_previous: dict[str, str] = field(default_factory=dict)
    # prototype -> its release under a private mode (epsilon spent, delta, noise, bound)
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)


class _Collector:
    """State of one round for one prototype: the aggregate of the client weights and of
    their teacher logits (streaming for FedAvg, per client for the robust methods).
    ``private``: the accumulator of a private mode, which replaces the aggregator's: the
    clipped, noised sum of central DP (released even when nobody answered), or the
    secure sum's mean (released once the transport handed on the round's sum)."""

    def __init__(
        self,
        aggregator: Aggregator,
        reference: State,
        keep_client_logits: bool,
        private: ClippedSum | SecureMean | None = None,
    ) -> None:
        self.private = private
        self.fedavg: StateAccumulator = (
            private if private is not None else aggregator.states(reference)
        )
        self.logits: LogitsAccumulator = aggregator.logits()
        self.client_logits: list[torch.Tensor] = []
        self.keep = keep_client_logits

    @property
    def releases(self) -> bool:
        """Whether the round gives this prototype a new aggregate."""
        if isinstance(self.private, SecureMean):
            return self.private.releases
        return self.private is not None or self.fedavg.count > 0


def sample_clients(
    available: list[str], total: int, rate: float, rng: np.random.Generator
) -> list[str]:
    """ceil(rate * total) clients, at most those available, at least one if any."""
    want = max(1, math.ceil(rate * total - 1e-9))
    k = min(want, len(available))
    return sorted(rng.choice(sorted(available), size=k, replace=False).tolist()) if k else []


@dataclass(frozen=True, kw_only=True)
class _TierWeights:
    """A tier's sampled clients (``plan``, the list itself) and their allowances under
    ``weight_cap``: ``caps`` (the known, non-zero ones), their sum ``known``, and how many
    have none (``unknown``)."""

    plan: list[str]
    weight_cap: Callable[[str], int | None]
    members: frozenset[str]
    caps: dict[str, float]
    known: float
    unknown: int

    @classmethod
    def of(cls, plan: list[str], weight_cap: Callable[[str], int | None]) -> _TierWeights:
        caps = {c: float(cap) for c in plan if (cap := weight_cap(c))}
        return cls(
            plan=plan,
            weight_cap=weight_cap,
            members=frozenset(plan),
            caps=caps,
            known=sum(caps.values()),
            unknown=len(set(plan) - caps.keys()),
        )


class RoundEngine:
    """Runs TAKFL (or a baseline) rounds over any :class:`Transport`."""

    def __init__(
        self,
        cfg: FederationConfig,
        models: dict[str, ModelSpec],
        data: ServerData,
        transport: Transport,
        *,
        algorithm: Algorithm | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        policy: RoundPolicy | None = None,
        on_update: Callable[[ClientUpdate], None] | None = None,
        clock: Callable[[], float] = time.time,
        weight_cap: Callable[[str], int | None] | None = None,
        privacy: RunPrivacy | None = None,
        judge_updates: bool = True,
    ) -> None:
        """``weight_cap(client)``: the most samples (FedAvg weight) a client may count for,
        None for no cap; weights above it are clipped to it. ``privacy``: the run's budget
        (default: built from the config for its own number of rounds). ``judge_updates``:
        every update passes the config's intake bounds and validation-aware acceptance
        (:class:`coordinator.influence.UpdateGuard`) before it counts; False takes them
        as they come (for tests of the server step's own fallbacks).

        Raises:
            PrivacyConfigError: the algorithm or aggregation cannot run in the config's
                privacy mode.
            PrivacyBudgetExceeded: the config's noise cannot last the run."""
        self.cfg = cfg
        self.algorithm = algorithm if algorithm is not None else resolve_algorithm(cfg.algorithm)
        self.models = models
        self.data = data
        self.transport = transport
        self.device = torch.device(device)
        self.seed = seed
        self.policy = policy or RoundPolicy()
        self.on_update = on_update
        self.clock = clock
        self.weight_cap = weight_cap or (lambda client: None)
        self.aggregator = make_aggregator(cfg.aggregation)
        resolve_privacy(cfg.privacy, self.algorithm, self.aggregator)
        self.privacy = privacy if privacy is not None else build_privacy(cfg, rounds=cfg.rounds)
        self.teacher_from_aggregate = self.privacy.mode.teacher_from_aggregate
        self.scratch: dict[str, nn.Module] = {}
        self.globals: dict[str, State] = {}
        for i, p in enumerate(cfg.prototypes):
            torch.manual_seed(seed * 100 + i)
            model = build_model(
                models[p.name].builder, data.num_classes, data.input_shape, **models[p.name].args
            )
            self.globals[p.name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.scratch[p.name] = model.to(self.device)
        self.trainings = {p.name: prototype_training(cfg, p.name) for p in cfg.prototypes}
        self.rejected = 0
        self.refusals: Counter[str] = Counter()  # the guard's refusals, by Refusal value
        self._plan: dict[str, list[str]] = {}  # the round's sampled clients, by prototype
        self._tiers: dict[str, _TierWeights] = {}  # their allowances, summed (see share)
        self.guard: UpdateGuard | None = None
        if judge_updates:
            # the round-0 globals (rebuilt identically on --resume) are the guard's fixed
            # reference: no accepted update can loosen the bounds
            self.guard = UpdateGuard(
                cfg.intake,
                dict(self.globals),
                self.scratch,
                data.val_x,
                data.val_y,
                validation=self.algorithm.validation,
            )
            transport.bound_updates(self.guard.bounds)

    # -- sampling and tasks -------------------------------------------------
    def plan(self, round_id: int) -> dict[str, list[str]]:
        rng = np.random.default_rng([self.seed, round_id])
        available = self.transport.clients()
        return {
            p.name: sample_clients(available.get(p.name, []), p.clients, p.sample_rate, rng)
            for p in self.cfg.prototypes
        }

    def tasks(self, round_id: int, plan: dict[str, list[str]]) -> list[Task]:
        deadline = self.clock() + self.policy.deadline_s
        out = []
        for proto, ids in plan.items():
            for cid in ids:
                seed = int(
                    np.random.default_rng([self.seed, round_id, *cid.encode()]).integers(2**31)
                )
                out.append(
                    Task(
                        round_id=round_id,
                        prototype=proto,
                        client_id=cid,
                        model=self.models[proto],
                        global_state=self.globals[proto],
                        deadline=deadline,
                        seed=seed,
                        training=self.trainings[proto],
                        noise_multiplier=self.privacy.client_noise(proto),
                    )
                )
        return out

    # -- collection ---------------------------------------------------------
    def weight(self, upd: ClientUpdate) -> float | None:
        """The update's aggregation weight: its sample count clipped to the client's cap;
        None (refuse it) for a count below one."""
        if upd.num_samples < 1:
            return None
        cap = self.weight_cap(upd.client_id)
        if cap is not None and upd.num_samples > cap:
            log.warning(
                "%s claims %d samples; weight clipped to its allowance %d",
                upd.client_id,
                upd.num_samples,
                cap,
            )
            return float(cap)
        return float(upd.num_samples)

    def share(self, upd: ClientUpdate, weight: float) -> float:
        """The update's expected share of its tier's aggregate: its weight against those
        of the tier's other sampled clients, each counted at its allowance (unknown: as
        heavy as this one), so a client with most of the weight is judged near 1.

        O(1) per update: the tier's allowances are summed once per plan (and weight cap)."""
        tier = self._tier(upd.prototype)
        own = tier.caps.get(upd.client_id)
        known = tier.known - (own or 0.0)
        unknown = tier.unknown - (1 if upd.client_id in tier.members and not own else 0)
        return weight / (weight + known + unknown * weight)

    def _tier(self, prototype: str) -> _TierWeights:
        """The allowances of ``prototype``'s sampled clients, summed once per plan."""
        ids = self._plan.get(prototype, [])
        tier = self._tiers.get(prototype)
        if tier is None or tier.plan is not ids or tier.weight_cap is not self.weight_cap:
            tier = self._tiers[prototype] = _TierWeights.of(ids, self.weight_cap)
        return tier

    def absorb(self, upd: ClientUpdate, col: _Collector) -> bool:
        """Fold one update into the round's aggregates (the client model is then dropped
        unless the aggregator keeps it); False if it cannot count."""
        weight = self.weight(upd)
        if weight is None:
            log.warning("ignoring update of %s: %d samples", upd.client_id, upd.num_samples)
            return False
        if self.guard is not None:
            share = self.share(upd, weight)
            verdict = self.guard.judge(upd.prototype, upd.state, self.globals[upd.prototype], share)
            if not verdict.accepted:
                log.warning(
                    "refused update of %s (round %d): %s", upd.client_id, upd.round_id, verdict
                )
                self.refusals[verdict.reason.value if verdict.reason else "refused"] += 1
                self.transport.refused(upd, verdict)
                return False
        col.fedavg.add(upd.state, weight)
        if not self.algorithm.needs_teacher_logits or self.teacher_from_aggregate:
            return True  # teacher logits unused, or taken from the released aggregate
        model = self.scratch[upd.prototype]
        model.load_state_dict(upd.state)
        logits = predict_logits(model, self.data.public_x)
        col.logits.add(logits)
        if col.keep:
            col.client_logits.append(logits)
        return True

    def _quorum_met(self, plan: dict[str, list[str]], got: dict[str, set[str]]) -> bool:
        return all(
            len(got[p]) >= math.ceil(self.policy.quorum * len(ids) - 1e-9)
            for p, ids in plan.items()
            if ids
        )

    def _stop_awaiting(
        self, round_id: int, expected: dict[str, set[str]], waiting: dict[str, set[str]]
    ) -> None:
        """Stop awaiting the clients whose update of ``round_id`` the transport refused on
        receipt (their final answer): without this a refused client keeps the round open
        until its hard limit."""
        for r, client in self.transport.refused_answers():
            if r != round_id:
                continue
            for p, ids in waiting.items():
                if client in ids:
                    ids.discard(client)
                    expected[p].discard(client)
                    log.info("round %d: %s answered with a refused update", round_id, client)

    def collect(
        self,
        round_id: int,
        plan: dict[str, list[str]],
        collectors: dict[str, _Collector],
        got: dict[str, set[str]] | None = None,
    ) -> dict[str, set[str]]:
        """Receive updates until all arrived, or the deadline passed with a quorum,
        or the hard limit passed."""
        got = got if got is not None else {p: set() for p in plan}
        expected = {p: set(ids) for p, ids in plan.items()}
        start = self.clock()
        deadline, hard = (
            start + self.policy.deadline_s,
            start + self.policy.deadline_s + self.policy.max_wait_s,
        )
        # a secure round's stages follow its keys; it ends with its sum (or its failure)
        secure = self.privacy.mode.secure_sum
        hard += self.privacy.secure_stages_s()
        waiting = {p: expected[p] - got[p] for p in plan}  # kept up to date: O(1) per update
        while any(waiting.values()):
            now = self.clock()
            if now >= hard or (now >= deadline and not secure and self._quorum_met(plan, got)):
                missing = {p: sorted(ids) for p, ids in waiting.items() if ids}
                log.warning("round %d closes without %s", round_id, missing)
                break
            self._stop_awaiting(round_id, expected, waiting)
            upd = self.transport.next_update(timeout=min(1.0, max(0.05, deadline - now)))
            if upd is None:
                continue
            if isinstance(upd, SecureSum):
                self._take_sum(round_id, upd, collectors, waiting, got)
                continue
            if (
                upd.round_id != round_id
                or upd.prototype not in expected
                or upd.client_id not in expected[upd.prototype]
                or upd.client_id in got[upd.prototype]
            ):
                self.rejected += 1
                log.info("ignoring update from %s for round %d", upd.client_id, upd.round_id)
                continue
            waiting[upd.prototype].discard(upd.client_id)  # answered: no longer awaited
            if not self.absorb(upd, collectors[upd.prototype]):
                self.rejected += 1
                expected[upd.prototype].discard(upd.client_id)  # answered, refused: not awaited
                continue
            got[upd.prototype].add(upd.client_id)
            if self.on_update is not None:
                self.on_update(upd)
        return got

    def _take_sum(
        self,
        round_id: int,
        secure: SecureSum,
        collectors: dict[str, _Collector],
        waiting: dict[str, set[str]],
        got: dict[str, set[str]],
    ) -> None:
        """A prototype's secure sum (or why there is none) closes its round: nobody of
        it is awaited any longer; those in the sum count as received."""
        col = collectors.get(secure.prototype)
        private = col.private if col is not None else None
        p = secure.prototype
        if secure.round_id != round_id or not isinstance(private, SecureMean) or not waiting[p]:
            self.rejected += 1
            log.info("ignoring a secure sum of %s for round %d", p, secure.round_id)
            return
        if secure.total is None:
            private.fail(secure.failure or "no sum")
        else:
            private.set_sum(secure.total, secure.clients)
        waiting[p].clear()
        got[p].clear()
        got[p].update(private.contributors)
        if private.failure is not None:
            log.warning(
                "round %d, prototype %s: secure aggregation: %s", round_id, p, private.failure
            )
        else:
            log.info("round %d, prototype %s: secure sum of %d clients", round_id, p, private.count)

    # -- one round ----------------------------------------------------------
    def run_round(
        self,
        round_id: int,
        resumed: list[ClientUpdate] | None = None,
        plan: dict[str, list[str]] | None = None,
    ) -> RoundResult:
        """One full round. ``resumed`` are updates of this round persisted before a restart;
        they are folded in and their clients are not asked again."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        plan = plan if plan is not None else self.plan(round_id)
        available = self.transport.clients()
        self.privacy.check_round(round_id, plan, available)  # before any task goes out
        keep = self.algorithm.needs_client_logits
        collectors = {
            p: _Collector(
                self.aggregator,
                self.globals[p],
                keep,
                self.privacy.accumulator(round_id, p, self.globals[p], len(plan[p])),
            )
            for p in plan
        }
        got: dict[str, set[str]] = {p: set() for p in plan}
        self._plan = plan
        if self.guard is not None:
            self.guard.start_round()
        for upd in resumed or []:
            wanted = upd.prototype in plan and upd.client_id in plan[upd.prototype]
            if wanted and self.absorb(upd, collectors[upd.prototype]):
                got[upd.prototype].add(upd.client_id)
        todo = [t for t in self.tasks(round_id, plan) if t.client_id not in got[t.prototype]]
        self.transport.send_tasks(todo)
        self.collect(round_id, plan, collectors, got)
        timings["collect_s"] = time.perf_counter() - t0
        if self.guard is not None:
            timings["guard_s"] = self.guard.seconds  # part of collect_s

        kept: dict[str, str] = {}
        released: dict[str, dict[str, float]] = {}
        protos = []
        for p in self.cfg.prototypes:
            col = collectors[p.name]
            protos.append(self._prototype_input(p.name, col, len(plan.get(p.name, [])), kept))
            if isinstance(col.private, ClippedSum) or (
                isinstance(col.private, SecureMean)
                and col.private.releases
                and p.name in self.privacy.budgets
            ):
                released[p.name] = self.privacy.released(
                    p.name, col.private, plan[p.name], available.get(p.name, [])
                )
        d = self.data
        outputs, step_times = server_step(
            protos,
            StepData(d.public_x, d.val_x, d.val_y),
            self.algorithm,
            seed=self.seed * 10_000 + round_id,
        )
        timings.update(step_times)
        t1 = time.perf_counter()
        acc: dict[str, float] = {}
        val_acc: dict[str, float] = {}
        for name, out in outputs.items():
            bad = non_finite_entry(out.state)
            if bad is None:
                self.globals[name] = out.state
            else:
                kept[name] = (
                    f"{self.algorithm.name} server step gave NaN/inf in {bad}; previous global kept"
                )
                log.warning("round %d, prototype %s: %s", round_id, name, kept[name])
            model = self.scratch[name]
            model.load_state_dict(self.globals[name])
            acc[name] = accuracy(model, d.test_x, d.test_y)
            if len(d.val_y):  # for choosing settings on validation, never on the test set
                val_acc[name] = accuracy(model, d.val_x, d.val_y)
            self.transport.publish_global(round_id, name, self.globals[name])
        timings["eval_s"] = time.perf_counter() - t1
        return RoundResult(
            round_id=round_id,
            accuracy=acc,
            lambdas={n: o.lambdas for n, o in outputs.items()},
            received={p: len(got[p]) for p in plan},
            sampled={p: len(ids) for p, ids in plan.items()},
            timings=timings,
            info={
                n: o.info | ({"global_val_accuracy": val_acc[n]} if n in val_acc else {})
                for n, o in outputs.items()
            },
            kept_previous=kept,
            privacy=released,
        )

    def _prototype_input(
        self, name: str, col: _Collector, sampled: int, kept: dict[str, str]
    ) -> PrototypeInput:
        """What the server step gets of one prototype: its aggregate (the previous global
        when nothing was released or the aggregate is not finite, with the reason put in
        ``kept``) and its teacher logits (the clients' mean, or under a private mode the
        logits of the released aggregate)."""
        has = col.releases
        if not has and isinstance(col.private, SecureMean):
            why = col.private.failure or "no secure sum arrived"
            kept[name] = f"secure aggregation: {why}; previous global kept"
        avg = col.fedavg.result() if has else self.globals[name]
        bad = non_finite_entry(avg)
        if bad is not None:
            kept[name] = f"aggregate has NaN/inf in {bad}"
            avg = self.globals[name]
        teacher, clients = None, 0
        if has and bad is None and self.algorithm.needs_teacher_logits:
            if self.teacher_from_aggregate:
                model = self.scratch[name]
                model.load_state_dict(avg)
                teacher, clients = predict_logits(model, self.data.public_x), sampled
            elif col.logits.count:
                teacher, clients = col.logits.mean(), col.logits.count
        if teacher is not None and not bool(torch.isfinite(teacher).all()):
            kept[name] = "teacher logits have NaN/inf; prototype left out as a teacher"
            teacher = None
        return PrototypeInput(
            name=name,
            model=self.scratch[name],
            avg_state=avg,
            mean_logits=teacher,
            num_clients=clients if teacher is not None else 0,
            client_logits=col.client_logits if teacher is not None else [],
        )
