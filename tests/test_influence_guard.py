"""Bounded influence inside the bound: validation-aware acceptance (takfl.influence) and the
engine's guard (coordinator.influence) against poisoning that every norm bound lets in."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from coordinator.engine import RoundEngine, _Collector
from coordinator.influence import UpdateGuard
from coordinator.inputs import prototype_models, server_data
from coordinator.transport.base import ClientUpdate, Task
from coordinator.transport.inprocess import InProcessTransport, VirtualClient
from takfl.config import FederationConfig, load_federation, prototype_training
from takfl.federation_data import build_federation_data
from takfl.influence import (
    CostMargins,
    ValidationCost,
    ValidationScore,
    ValidationScorer,
    partial_application,
    validation_cost,
    validation_score,
)
from takfl.models import build_model
from takfl.wire.validation import Refusal, delta_norm

torch.set_num_threads(1)
HEAD = ("head.3.weight", "head.3.bias")  # the digits CNNs' classifier
TARGET = 3  # the class an attacker pushes


# -- pure maths ---------------------------------------------------------------------------------
def test_partial_application_moves_floats_by_the_share_and_keeps_counters() -> None:
    base = {"w": torch.zeros(3), "n": torch.tensor(4)}
    state = {"w": torch.tensor([2.0, -4.0, 6.0]), "n": torch.tensor(9)}
    out = partial_application(base, state, 0.5)
    assert torch.equal(out["w"], torch.tensor([1.0, -2.0, 3.0])) and int(out["n"]) == 9
    assert torch.equal(partial_application(base, state, 1.0)["w"], state["w"])
    with pytest.raises(ValueError, match="share"):
        partial_application(base, state, 0.0)


def test_validation_score_of_a_known_linear_model() -> None:
    # Prepare: logits = x, so the prediction is the largest input
    model = nn.Linear(3, 3, bias=False)
    eye = {"weight": torch.eye(3)}
    x = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 2, 1])
    own = model.weight.detach().clone()
    # Execute
    score = validation_score(model, eye, x, y, batch_size=3)
    # Assert
    assert score.accuracy == pytest.approx(75.0)
    right = -math.log(math.exp(3) / (math.exp(3) + 2))
    wrong = -math.log(1 / (math.exp(3) + 2))
    assert score.loss == pytest.approx((3 * right + wrong) / 4, rel=1e-5)
    assert torch.equal(model.weight.detach(), own)  # the module's own weights are untouched


def test_extreme_logits_cost_infinite_loss_not_nan() -> None:
    model = nn.Linear(2, 2)
    state = {"weight": torch.zeros(2, 2), "bias": torch.tensor([0.0, 3e38])}
    score = validation_score(model, state, torch.ones(2, 2), torch.tensor([0, 0]))
    assert score.accuracy == 0.0 and score.loss > 1e30


def test_cost_margins() -> None:
    margins = CostMargins(accuracy_points=30.0, loss_nats=2.0)
    cost = validation_cost(ValidationScore(90.0, 0.2), ValidationScore(65.0, 0.9))
    assert cost == ValidationCost(25.0, pytest.approx(0.7))  # type: ignore[arg-type]
    assert margins.exceeded(cost) is None
    assert "accuracy" in (margins.exceeded(ValidationCost(31.0, 0.0)) or "")
    assert "loss" in (margins.exceeded(ValidationCost(0.0, math.inf)) or "")
    assert CostMargins(accuracy_points=None, loss_nats=None).exceeded(ValidationCost(99, 9)) is None


# -- the engine's guard on the digits federation ---------------------------------------------------
def small_config(clients: tuple[int, int, int] = (2, 2, 2)) -> FederationConfig:
    cfg = load_federation("digits")
    for p, n in zip(cfg.prototypes, clients, strict=True):
        p.clients, p.sample_rate = n, 1.0
    cfg.algorithm.distill.steps = 10
    cfg.algorithm.lambdas.search_candidates = 4
    return cfg


def bias_attack(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The issue's attacker: the whole norm the old intake allowed (5 x ||global||) on one
    class's classifier bias."""
    bias = base[HEAD[1]].clone()
    bias[TARGET] += 0.99 * 5.0 * max(delta_norm(base), 1.0)
    return {**base, HEAD[1]: bias}


def row_attack(base: dict[str, torch.Tensor], scale: float = 2.0) -> dict[str, torch.Tensor]:
    """Inside every per-tensor bound: one class's row (along all-ones) and bias raised by
    ``scale`` x their norms in the global."""
    w, b = base[HEAD[0]].clone(), base[HEAD[1]].clone()
    b[TARGET] += scale * float(base[HEAD[1]].norm())
    w[TARGET] += scale * float(base[HEAD[0]].norm()) / math.sqrt(w.shape[1])
    return {**base, HEAD[0]: w, HEAD[1]: b}


class PoisonedTransport(InProcessTransport):
    """Virtual clients; ``liar``'s update of ``round_id`` is replaced by ``attack(global)``."""

    def __init__(self, *args: Any, liar: str, round_id: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.liar, self.round_id = liar, round_id
        self.bases: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    def send_tasks(self, tasks: list[Task]) -> None:
        for t in tasks:
            self.bases[(t.round_id, t.prototype)] = t.global_state
        super().send_tasks(tasks)

    def next_update(self, timeout: float) -> ClientUpdate | None:
        upd = super().next_update(timeout)
        if upd is not None and upd.client_id == self.liar and upd.round_id == self.round_id:
            upd.state = bias_attack(self.bases[(upd.round_id, upd.prototype)])
        return upd


def run(cfg: FederationConfig, rounds: int, liar: str | None) -> tuple[RoundEngine, list[Any]]:
    data = build_federation_data(cfg, 0)
    clients = [
        VirtualClient(client_id=cid, prototype=p, x=x, y=y, training=prototype_training(cfg, p))
        for cid, (p, x, y) in data.clients.items()
    ]
    transport = PoisonedTransport(
        clients,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        liar=liar or "",
        round_id=rounds,
    )
    engine = RoundEngine(
        cfg, prototype_models(cfg), server_data(data, torch.device("cpu")), transport
    )
    return engine, [engine.run_round(r) for r in range(1, rounds + 1)]


@pytest.fixture(scope="module")
def trained() -> tuple[RoundEngine, InProcessTransport]:
    """A (2, 2, 2) digits federation after two honest rounds."""
    engine, _ = run(small_config(), 2, None)
    assert isinstance(engine.transport, InProcessTransport)
    return engine, engine.transport


def absorbs(engine: RoundEngine, proto: str, state: dict[str, torch.Tensor]) -> bool:
    col = _Collector(engine.aggregator, engine.globals[proto], False)
    update = ClientUpdate(
        round_id=3, prototype=proto, client_id=f"{proto}-001", num_samples=200, state=state
    )
    return engine.absorb(update, col)


@pytest.mark.slow  # a real broker and seconds of waiting: the full suite runs it
def test_a_poisoned_round_leaves_every_tier_within_5_points_of_a_clean_run() -> None:
    # Prepare / Execute: the same seed, once clean, once with L-001 poisoning round 4 (the
    # issue's round: L fell from 90.0 % to 13.9 %)
    _, clean = run(small_config(), 4, None)
    engine, poisoned = run(small_config(), 4, "L-001")
    # Assert
    for proto, acc in clean[-1].accuracy.items():
        assert abs(poisoned[-1].accuracy[proto] - acc) <= 5.0, (proto, clean[-1], poisoned[-1])
    assert engine.refusals, "the poisoned update was not refused"
    assert poisoned[-1].received["L"] == 1 and clean[-1].received["L"] == 2


def test_an_attack_inside_every_norm_bound_is_refused_on_validation(
    trained: tuple[RoundEngine, InProcessTransport],
) -> None:
    # Prepare
    engine, _ = trained
    engine._plan = engine.plan(3)
    engine.guard.start_round()  # type: ignore[union-attr]
    base = engine.globals["L"]
    attack = row_attack(base)
    verdict_bounds = engine.guard.bounds["L"]  # type: ignore[union-attr]
    # Execute
    accepted = absorbs(engine, "L", attack)
    # Assert: inside the per-tensor caps, refused only by its cost on validation
    caps = verdict_bounds.tensor_caps or {}
    for key in HEAD:
        assert float((attack[key] - base[key]).norm()) < caps[key]
    assert not accepted
    assert engine.refusals["validation_cost"] >= 1


def test_honest_updates_pass_the_guard(trained: tuple[RoundEngine, InProcessTransport]) -> None:
    # Prepare: every client trains once more from the current globals
    engine, transport = trained
    plan = engine._plan = engine.plan(3)
    engine.guard.start_round()  # type: ignore[union-attr]
    transport.send_tasks(engine.tasks(3, plan))
    before = sum(engine.refusals.values())
    # Execute
    verdicts = []
    while (upd := transport.next_update(0.0)) is not None:
        col = _Collector(engine.aggregator, engine.globals[upd.prototype], False)
        verdicts.append(engine.absorb(upd, col))
    # Assert
    assert verdicts and all(verdicts)
    assert sum(engine.refusals.values()) == before


def test_negative_running_variance_is_refused_by_the_engine(
    trained: tuple[RoundEngine, InProcessTransport],
) -> None:
    engine, _ = trained
    base = engine.globals["L"]
    state = {**base, "features.5.running_var": -torch.ones_like(base["features.5.running_var"])}
    assert not absorbs(engine, "L", state)
    assert engine.refusals["bad_variance"] >= 1


def test_an_accepted_update_does_not_loosen_the_next_bound(
    trained: tuple[RoundEngine, InProcessTransport],
) -> None:
    # Prepare: as if a poisoned update had been accepted: the L global's bias at 116 (the
    # issue's figure), its norm ~ 5x the initial one
    engine, _ = trained
    saved = engine.globals["L"]
    loosened = dict(saved)
    bias = saved[HEAD[1]].clone()
    bias[TARGET] = 116.0
    loosened[HEAD[1]] = bias
    engine.globals["L"] = loosened
    # a delta the old rule (5 x the current global's norm) let through, spread evenly
    cap = 4.0 * delta_norm(loosened)
    delta_w = torch.full_like(saved[HEAD[0]], cap / math.sqrt(saved[HEAD[0]].numel()))
    try:
        # Execute
        accepted = absorbs(engine, "L", {**loosened, HEAD[0]: loosened[HEAD[0]] + delta_w})
    finally:
        engine.globals["L"] = saved
    # Assert
    assert not accepted
    assert engine.refusals["norm_bound"] + engine.refusals["tensor_bound"] >= 1


def test_shares_follow_the_plan_and_the_allowances() -> None:
    # Prepare: (2, 2, 1): L has one client, its update is the tier's whole aggregate
    engine, _ = run(small_config((2, 2, 1)), 1, None)
    engine._plan = engine.plan(2)
    state = engine.globals["S"]

    def share(proto: str, client: str, weight: float) -> float:
        update = ClientUpdate(
            round_id=2, prototype=proto, client_id=client, num_samples=int(weight), state=state
        )
        return engine.share(update, weight)

    # Execute / Assert
    assert share("L", "L-000", 300.0) == 1.0
    assert share("S", "S-000", 40.0) == 0.5  # no allowance known: peers as heavy as it
    caps = {"S-001": 10}
    engine.weight_cap = caps.get
    assert share("S", "S-000", 990.0) == pytest.approx(0.99)  # most of the tier's weight
    assert not absorbs(engine, "L", bias_attack(engine.globals["L"]))


def test_validation_withheld_from_every_method_switches_the_cost_test_off(
    trained: tuple[RoundEngine, InProcessTransport],
) -> None:
    engine, _ = trained
    args = (engine.cfg.intake, engine.globals, engine.scratch, engine.data.val_x)
    on = UpdateGuard(*args, engine.data.val_y)
    withheld = UpdateGuard(*args, engine.data.val_y, validation=False)
    empty = UpdateGuard(*args[:3], engine.data.val_x[:0], engine.data.val_y[:0])
    assert on.validating and not withheld.validating and not empty.validating
    attack = row_attack(engine.globals["L"])
    assert withheld.judge("L", attack, engine.globals["L"], 0.5).accepted
    assert on.judge("L", attack, engine.globals["L"], 0.5).reason is Refusal.VALIDATION_COST


def test_shares_of_a_large_tier_sum_its_allowances_once_per_plan() -> None:
    # Prepare: 3,000 sampled clients, half with an allowance; the weight caps are counted
    engine, _ = run(small_config((2, 2, 1)), 1, None)
    clients = [f"S-{i:04d}" for i in range(3000)]
    engine._plan = {"S": clients}
    calls: list[str] = []

    def cap(client: str) -> int | None:
        calls.append(client)
        return 10 + int(client[2:]) % 7 if int(client[2:]) % 2 else None

    engine.weight_cap = cap
    state = engine.globals["S"]

    def expected(client: str, weight: float) -> float:  # the definition, peer by peer
        others = sum(float(cap(c) or weight) for c in clients if c != client)
        return weight / (weight + others)

    # Execute
    shares = [
        engine.share(
            ClientUpdate(round_id=2, prototype="S", client_id=c, num_samples=20, state=state),
            20.0,
        )
        for c in clients
    ]
    counted = len(calls)

    # Assert
    assert counted == len(clients)
    for i in (0, 1, 1500, 2999):
        assert shares[i] == expected(clients[i], 20.0)


@pytest.mark.parametrize("builder", ["mlp_digits", "cnn_digits_large"])
def test_the_scorer_scores_exactly_as_the_functional_call(builder: str) -> None:
    # Prepare: a model (with BatchNorm statistics for the CNN) and three states of it
    torch.manual_seed(0)
    model = build_model(builder, 10, (1, 8, 8))
    own = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(37, 1, 8, 8), torch.randint(0, 10, (37,))
    states = [
        {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in own.items()}
        for _ in range(3)
    ]
    scorer = ValidationScorer(model)

    # Execute
    fast = [scorer.score(s, x, y, batch_size=16) for s in states]
    reference = [validation_score(model, s, x, y, batch_size=16) for s in states]

    # Assert: the same numbers, and the caller's module untouched
    assert fast == reference
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())
