"""The run directory: atomic state, resume after an interruption, pending updates kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.engine import RoundPolicy
from coordinator.service import FederationRun, ServeOptions
from coordinator.store import RunStore, RunStoreError
from coordinator.transport.base import ClientUpdate
from coordinator.transport.inprocess import InProcessTransport, VirtualClient
from takfl.checkpoint import load_model
from takfl.config import load_federation, prototype_training
from takfl.federation_data import build_federation_data


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    cfg = load_federation("digits")
    cfg.algorithm.distill.steps = 5
    cfg.algorithm.lambdas.search_candidates = 2
    data = build_federation_data(cfg, 0)
    return cfg, data


def transport(cfg, data) -> InProcessTransport:  # type: ignore[no-untyped-def]
    clients = [
        VirtualClient(client_id=cid, prototype=p, x=x, y=y, training=prototype_training(cfg, p))
        for cid, (p, x, y) in data.clients.items()
    ]
    return InProcessTransport(clients, num_classes=10, input_shape=(1, 8, 8))


def make_run(
    cfg, data, root: Path, rounds: int, resume: bool = False, tr: InProcessTransport | None = None
) -> FederationRun:  # type: ignore[no-untyped-def]
    return FederationRun(
        cfg,
        data,
        tr or transport(cfg, data),
        RunStore(root),
        torch.device("cpu"),
        ServeOptions(rounds=rounds, resume=resume, policy=RoundPolicy(deadline_s=30)),
    )


def test_a_run_writes_the_documented_layout(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, data = setup
    make_run(cfg, data, tmp_path, rounds=2).run()
    store = RunStore(tmp_path)
    state = store.read_state()
    assert state["round"] == 2 and state["phase"] == "finished"
    assert (tmp_path / "config.yaml").is_file()
    for p in ("S", "M", "L"):
        for r in (0, 1, 2):
            assert store.model_path(p, r).is_file()
    _model, meta = load_model(store.model_path("L", 2))
    assert meta.round == 2 and meta.prototype == "L" and meta.builder == "cnn_digits_large"
    assert len(store.metrics()) == 2 * 3
    assert not store.pending_dir(1).exists()


def test_an_existing_run_is_not_overwritten_without_resume(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, data = setup
    make_run(cfg, data, tmp_path, rounds=1).run()
    with pytest.raises(RunStoreError, match="--resume"):
        make_run(cfg, data, tmp_path, rounds=2).run()


@pytest.mark.slow
def test_resume_continues_and_matches_an_uninterrupted_run(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, data = setup
    straight = make_run(cfg, data, tmp_path / "straight", rounds=2).run()

    # Interrupted: round 1 completes, round 2 is killed after one accepted update.
    make_run(cfg, data, tmp_path / "cut", rounds=1).run()
    tr = transport(cfg, data)

    class Killed(Exception):
        pass

    run = make_run(cfg, data, tmp_path / "cut", rounds=2, resume=True, tr=tr)
    seen: list[ClientUpdate] = []

    def save_then_die(upd: ClientUpdate) -> None:
        run.store.save_pending(upd)
        seen.append(upd)
        if len(seen) == 1:
            raise Killed

    run.engine.on_update = save_then_die
    with pytest.raises(Killed):
        run.run()
    store = RunStore(tmp_path / "cut")
    assert store.read_state()["round"] == 1
    assert [u.client_id for u in store.pending(2)] == [seen[0].client_id]

    resumed = make_run(cfg, data, tmp_path / "cut", rounds=2, resume=True).run()
    assert store.read_state()["round"] == 2
    assert len(resumed) == 1 and resumed[0].round_id == 2
    assert resumed[0].received == straight[1].received
    assert resumed[0].accuracy == pytest.approx(straight[1].accuracy)
    assert len(store.metrics()) == 2 * 3
