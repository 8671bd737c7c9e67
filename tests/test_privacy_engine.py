"""The round engine under central DP: teachers come from the noised aggregate, never
from a client's model; every sampled prototype gets a noised release; the ledger and
the metrics record each release; a round past the budget never sends its tasks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import coordinator.engine as engine_module
from coordinator.engine import RoundEngine, ServerData
from coordinator.privacy import PrivacyBudgetExceeded, build_privacy, with_privacy
from coordinator.simulate import metrics_line
from coordinator.transport.base import ClientUpdate, Task, Transport
from takfl.algorithms import resolve_algorithm
from takfl.config import FederationConfig, load_federation, prototype_model
from takfl.privacy.accountant import epsilon_of
from takfl.server import StepOutput
from takfl.training import predict_logits


class EchoTransport(Transport):
    """Every task is answered at once with the global model plus ``shift`` everywhere."""

    def __init__(self, shift: float, silent: frozenset[str] = frozenset()) -> None:
        self.shift, self.silent = shift, silent
        self.queue: list[ClientUpdate] = []
        self.sent: list[Task] = []

    def clients(self) -> dict[str, list[str]]:
        return {
            "S": [f"S-{i:03d}" for i in range(10)],
            "M": [f"M-{i:03d}" for i in range(5)],
            "L": ["L-000", "L-001"],
        }

    def send_tasks(self, tasks: list[Task]) -> None:
        self.sent.extend(tasks)
        for t in tasks:
            if t.prototype in self.silent:
                continue
            state = {
                k: v + self.shift if v.is_floating_point() else v for k, v in t.global_state.items()
            }
            self.queue.append(
                ClientUpdate(
                    round_id=t.round_id,
                    prototype=t.prototype,
                    client_id=t.client_id,
                    num_samples=10,
                    state=state,
                )
            )

    def next_update(self, timeout: float) -> ClientUpdate | None:
        return self.queue.pop(0) if self.queue else None


def _data() -> ServerData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=g)
    return ServerData(
        public_x=x,
        val_x=x[:2],
        val_y=torch.zeros(2, dtype=torch.long),
        test_x=x[:2],
        test_y=torch.zeros(2, dtype=torch.long),
        num_classes=10,
        input_shape=(1, 8, 8),
    )


def _engine(
    cfg: FederationConfig, transport: Transport, rounds: int = 3
) -> tuple[RoundEngine, list[Any]]:
    models = {p.name: prototype_model(cfg, p.name) for p in cfg.prototypes}
    engine = RoundEngine(
        cfg,
        models,
        _data(),
        transport,
        algorithm=resolve_algorithm(cfg.algorithm, "takfl-reg"),
        privacy=build_privacy(cfg, rounds=rounds, noise_seed=1),
    )
    return engine, []


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The server step's inputs, and every model the engine computed logits of."""
    seen: dict[str, Any] = {"protos": None, "logits_of": 0}
    real = engine_module.predict_logits

    def counting(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        seen["logits_of"] += 1
        return real(model, x)

    def step(protos: list[Any], data: Any, algo: Any, *, seed: int) -> tuple[Any, Any]:
        seen["protos"] = protos
        return {p.name: StepOutput(p.avg_state, None) for p in protos}, {}

    monkeypatch.setattr(engine_module, "predict_logits", counting)
    monkeypatch.setattr(engine_module, "server_step", step)
    return seen


def _private(epsilon: float = 50.0) -> FederationConfig:
    """Digits under central DP at noise multiplier 2 (no calibration: fast)."""
    return with_privacy(
        load_federation("digits"),
        {"mode": "central-dp", "epsilon": epsilon, "noise_multiplier": 2.0},
    )


def _epsilon_after(rounds: int) -> float:
    """Epsilon of the L tier (every client every round) after ``rounds`` rounds at z = 2."""
    return epsilon_of("rdp", [(2.0, 1.0, rounds)], 1e-5)


def test_teachers_are_the_logits_of_the_noised_aggregates(captured: dict[str, Any]) -> None:
    cfg = _private()
    engine, _ = _engine(cfg, EchoTransport(shift=0.01))

    res = engine.run_round(1)

    protos = captured["protos"]
    assert captured["logits_of"] == len(protos)  # one per prototype, none per client
    for p in protos:
        model = engine.scratch[p.name]
        model.load_state_dict(p.avg_state)
        assert torch.equal(p.mean_logits, predict_logits(model, engine.data.public_x))
        assert p.num_clients == res.sampled[p.name]
        assert p.client_logits == []
    assert set(res.privacy) == {"S", "M", "L"}


def test_the_release_is_noised_and_clipped(captured: dict[str, Any]) -> None:
    cfg = _private()
    before = {k: v.clone() for k, v in _engine(cfg, EchoTransport(0.0))[0].globals["S"].items()}
    engine, _ = _engine(cfg, EchoTransport(shift=5.0))  # deltas far over the bound C = 1

    engine.run_round(1)

    avg = next(p for p in captured["protos"] if p.name == "S").avg_state
    floats = [k for k in before if before[k].is_floating_point()]
    moved = torch.cat([(avg[k] - before[k]).flatten() for k in floats]).double()
    # every client's delta is 5 * ones, clipped to norm C = 1: their mean is the unit vector
    unit = torch.ones_like(moved) / moved.numel() ** 0.5
    noise = moved - unit
    assert float(noise.std()) == pytest.approx(2.0 * 1.0 / 3, rel=0.15)  # z C / n sampled
    assert abs(float(noise @ unit)) < 4 * 2.0 / 3  # the shift itself is gone: only C = 1 left


def test_a_prototype_whose_clients_all_dropped_still_gets_a_noised_release(
    captured: dict[str, Any],
) -> None:
    cfg = _private()
    engine, _ = _engine(cfg, EchoTransport(shift=0.01, silent=frozenset({"M"})))
    before = {k: v.clone() for k, v in engine.globals["M"].items()}
    engine.policy = engine.policy.__class__(deadline_s=0.0, quorum=0.0, max_wait_s=0.0)

    res = engine.run_round(1)

    assert res.received["M"] == 0
    assert "M" in res.privacy
    avg = next(p for p in captured["protos"] if p.name == "M").avg_state
    assert any(not torch.equal(avg[k], before[k]) for k in before if before[k].is_floating_point())


def test_metrics_record_epsilon_growing_per_round(captured: dict[str, Any]) -> None:
    cfg = _private(_epsilon_after(3))
    engine, _ = _engine(cfg, EchoTransport(shift=0.01), rounds=3)
    algo = engine.algorithm

    eps = []
    for r in (1, 2, 3):
        lines = metrics_line(algo, 0, engine.run_round(r))
        eps.append({m["prototype"]: m["privacy"]["epsilon"] for m in lines})

    for proto in ("S", "M", "L"):
        assert 0 < eps[0][proto] < eps[1][proto] < eps[2][proto] <= _epsilon_after(3) + 1e-9
    assert lines[0]["privacy"]["delta"] == 1e-5


def test_a_round_past_the_budget_sends_no_task(captured: dict[str, Any]) -> None:
    cfg = _private((_epsilon_after(2) + _epsilon_after(3)) / 2)
    transport = EchoTransport(shift=0.01)
    engine, _ = _engine(cfg, transport, rounds=2)
    engine.run_round(1)
    engine.run_round(2)
    sent = len(transport.sent)

    with pytest.raises(PrivacyBudgetExceeded, match="round 3"):
        engine.run_round(3)

    assert len(transport.sent) == sent


def test_the_engine_refuses_fedet_under_central_dp() -> None:
    cfg = _private()
    cfg = cfg.model_copy(update={"algorithm": cfg.algorithm.model_copy(update={"name": "fedet"})})
    models = {p.name: prototype_model(cfg, p.name) for p in cfg.prototypes}

    with pytest.raises(ValueError, match="fedet"):
        RoundEngine(cfg, models, _data(), EchoTransport(0.0))
