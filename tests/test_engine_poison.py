"""No poison propagates through the server step: an update that got past every check
(here: in-process clients with the engine's own guard off) and turns a prototype's model
non-finite leaves that prototype on its previous global, recorded in the metrics,
and every other prototype finite."""

from __future__ import annotations

import torch

from coordinator.engine import RoundEngine
from coordinator.inputs import prototype_models, server_data
from coordinator.simulate import metrics_line
from coordinator.transport.base import ClientUpdate
from coordinator.transport.inprocess import InProcessTransport, VirtualClient
from takfl.config import load_federation, prototype_training
from takfl.federation_data import build_federation_data

torch.set_num_threads(1)


class PoisonedTransport(InProcessTransport):
    """Virtual clients; the L client's weights come back multiplied by 1e30 (finite)."""

    def next_update(self, timeout: float) -> ClientUpdate | None:
        upd = super().next_update(timeout)
        if upd is not None and upd.prototype == "L":
            upd.state = {k: v * 1e30 if v.is_floating_point() else v for k, v in upd.state.items()}
        return upd


def test_non_finite_server_output_keeps_the_previous_global() -> None:
    cfg = load_federation("digits")
    for p, clients in zip(cfg.prototypes, (2, 2, 1), strict=True):
        p.clients, p.sample_rate = clients, 1.0
    cfg.algorithm.distill.steps = 5
    cfg.algorithm.lambdas.search_candidates = 2
    data = build_federation_data(cfg, 0)
    clients = [
        VirtualClient(client_id=cid, prototype=p, x=x, y=y, training=prototype_training(cfg, p))
        for cid, (p, x, y) in data.clients.items()
    ]
    transport = PoisonedTransport(clients, num_classes=10, input_shape=(1, 8, 8))
    engine = RoundEngine(
        cfg,
        prototype_models(cfg),
        server_data(data, torch.device("cpu")),
        transport,
        judge_updates=False,  # the server step's own fallback is what is tested here
    )
    before = {k: v.clone() for k, v in engine.globals["L"].items()}
    res = engine.run_round(1)

    for name, state in engine.globals.items():
        for key, t in state.items():
            assert not t.is_floating_point() or bool(torch.isfinite(t).all()), (name, key)
    assert "L" in res.kept_previous, res.kept_previous
    for key, t in before.items():
        assert torch.equal(engine.globals["L"][key], t), key
    lines = {r["prototype"]: r for r in metrics_line(engine.algorithm, 0, res)}
    assert lines["L"]["kept_previous"] and "NaN" in lines["L"]["kept_previous"]
    # the honest tiers learnt (random guessing is 10%)
    assert res.accuracy["M"] > 30.0


def test_weights_are_clipped_to_the_allowance_and_zero_is_refused() -> None:
    cfg = load_federation("digits")
    data = build_federation_data(cfg, 0)
    transport = InProcessTransport([], num_classes=10, input_shape=(1, 8, 8))
    caps = {"L-000": 100}
    engine = RoundEngine(
        cfg,
        prototype_models(cfg),
        server_data(data, torch.device("cpu")),
        transport,
        weight_cap=caps.get,
    )
    state = engine.globals["L"]
    assert (
        engine.weight(
            ClientUpdate(
                round_id=1, prototype="L", client_id="L-000", num_samples=5000, state=state
            )
        )
        == 100.0
    )
    assert (
        engine.weight(
            ClientUpdate(round_id=1, prototype="L", client_id="L-000", num_samples=40, state=state)
        )
        == 40.0
    )
    assert (
        engine.weight(
            ClientUpdate(
                round_id=1, prototype="L", client_id="L-001", num_samples=5000, state=state
            )
        )
        == 5000.0
    )  # no cap known
    assert (
        engine.weight(
            ClientUpdate(round_id=1, prototype="L", client_id="L-000", num_samples=0, state=state)
        )
        is None
    )
