"""Simulation through any registered wire codec, with each virtual client's error-feedback
residual kept across rounds as an agent keeps it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from coordinator.simulate import (
    SimulationSpec,
    UploadTally,
    resolve_compression,
    run_simulation,
)
from coordinator.transport.base import ClientUpdate, Task
from coordinator.transport.inprocess import InProcessTransport, VirtualClient, codec_roundtrip
from takfl.algorithms import resolve_algorithm
from takfl.config import load_federation
from takfl.config.base import ModelSpec
from takfl.config.profile import TrainingSpec
from takfl.models import build_model
from takfl.run_layout import METRICS_FILE
from takfl.wire.codec_names import CodecNameError
from takfl.wire.codecs import resolve_codec

torch.set_num_threads(1)
SHAPE = (1, 8, 8)


def states(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    base = build_model("mlp_digits", 10, SHAPE, width=8).state_dict()
    trained = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
    return trained, base


def test_compression_resolves_one_codec_or_each_profiles_own() -> None:
    cfg = load_federation("digits")
    assert resolve_compression(cfg, None) is None
    one = resolve_compression(cfg, "sign1:block=64")
    assert one is not None and {p: str(c) for p, c in one.items()} == dict.fromkeys(
        ("S", "M", "L"), "sign1:block=64,density=1"
    )
    profile = resolve_compression(cfg, "profile")
    assert profile is not None
    assert {p: c.name for p, c in profile.items()} == {"S": "int8", "M": "fp16", "L": "fp16"}
    each = resolve_compression(cfg, "S=sign1:density=0.6; M=topk-int8 ;L=fp16")
    assert each is not None
    assert {p: str(c) for p, c in each.items()} == {
        "S": "sign1:block=256,density=0.6",
        "M": "topk-int8:density=0.03",
        "L": "fp16",
    }
    with pytest.raises(CodecNameError, match="unknown compression 'bf8'"):
        resolve_compression(cfg, "bf8")
    for bad in ("S=sign1;M=sign1", "S=sign1;M=sign1;L=fp16;S=fp16", "S=sign1;M=sign1;X=fp16"):
        with pytest.raises(CodecNameError, match="names each of S, M, L once"):
            resolve_compression(cfg, bad)


def test_roundtrip_without_feedback_is_the_codec_alone() -> None:
    trained, base = states(0)
    carried = codec_roundtrip(trained, base, resolve_codec("fp16"), None)
    assert carried.residual is None
    assert carried.nbytes == len(
        resolve_codec("fp16").encode({k: trained[k] - base[k] for k in base}, base)
    )
    for k in base:
        assert torch.allclose(carried.state[k], trained[k], atol=1e-3)


def test_roundtrip_with_feedback_returns_what_was_not_sent() -> None:
    trained, base = states(1)
    codec = resolve_codec("topk-int8:density=0.1")
    carried = codec_roundtrip(trained, base, codec, None, seed=3)
    assert carried.residual is not None
    for k, r in carried.residual.items():
        # full weights rebuilt + residual = what was trained
        assert torch.allclose(carried.state[k] + r, trained[k], atol=1e-5), k


def test_a_residual_that_no_longer_fits_is_dropped_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    trained, base = states(2)
    stale = {"fc.weight": torch.zeros(3, 3)}
    with caplog.at_level(logging.WARNING):
        carried = codec_roundtrip(trained, base, resolve_codec("sign1"), stale)
    assert "residual dropped" in caplog.text
    assert carried.residual is not None and set(carried.residual) != set(stale)


def test_transport_keeps_each_clients_residual_across_rounds() -> None:
    spec = TrainingSpec(epochs=1, batch_size=8, optimizer="sgd", learning_rate=0.05)
    g = torch.Generator().manual_seed(0)
    clients = [
        VirtualClient(
            client_id=f"c{i}",
            prototype="S",
            x=torch.randn(16, *SHAPE, generator=g),
            y=torch.randint(0, 10, (16,), generator=g),
            training=spec,
        )
        for i in range(2)
    ]
    codec = resolve_codec("sign1")
    transport = InProcessTransport(
        clients, num_classes=10, input_shape=SHAPE, codecs={"S": codec}, vectorise=False
    )
    torch.manual_seed(0)
    model = ModelSpec(builder="mlp_digits", args={"width": 8})
    glob = build_model("mlp_digits", 10, SHAPE, width=8).state_dict()

    def round_of(r: int, ids: list[str]) -> list[ClientUpdate]:
        transport.send_tasks(
            [
                Task(
                    round_id=r,
                    prototype="S",
                    client_id=c,
                    model=model,
                    global_state=glob,
                    deadline=0.0,
                    seed=r,
                )
                for c in ids
            ]
        )
        out = []
        while (u := transport.next_update(0.1)) is not None:
            out.append(u)
        return out

    first = round_of(1, ["c0"])
    assert first[0].metrics["upload_bytes"] < 0.06 * len(resolve_codec("fp32").encode(glob, glob))
    kept = transport.residual("c0")
    assert kept is not None and transport.residual("c1") is None
    round_of(2, ["c1"])
    assert transport.residual("c0") is kept  # untouched while c0 sits out
    round_of(3, ["c0"])
    assert transport.residual("c0") is not kept


def test_upload_tally_means_each_rounds_sizes_by_prototype() -> None:
    tally = UploadTally()
    for proto, size in [("S", 10.0), ("S", 20.0), ("M", 5.0)]:
        tally(
            ClientUpdate(
                round_id=1,
                prototype=proto,
                client_id="x",
                num_samples=1,
                state={},
                metrics={"upload_bytes": size},
            )
        )
    tally(ClientUpdate(round_id=1, prototype="L", client_id="y", num_samples=1, state={}))
    assert tally.take() == {"S": 15.0, "M": 5.0}
    assert tally.take() == {}


@pytest.mark.slow
def test_simulation_records_bytes_per_update_and_fp32_size(tmp_path: Path) -> None:
    cfg = load_federation("digits")
    cfg = cfg.model_copy(
        update={
            "algorithm": cfg.algorithm.model_copy(
                update={"distill": cfg.algorithm.distill.model_copy(update={"steps": 4})}
            )
        }
    )
    spec = SimulationSpec(
        algorithms=[resolve_algorithm(cfg.algorithm, "takfl-reg")],
        rounds=2,
        compression="topk-int8:density=0.05",
    )
    run_simulation(cfg, spec, tmp_path, torch.device("cpu"))
    lines = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert len(lines) == 2 * 3
    for rec in lines:
        assert 0 < rec["upload_bytes"] < 0.06 * rec["fp32_bytes"], rec["prototype"]
        assert rec["kept_previous"] is None
    fp32 = {r["prototype"]: r["fp32_bytes"] for r in lines}
    assert fp32["S"] < fp32["M"] < fp32["L"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["codecs"] == dict.fromkeys(("S", "M", "L"), "topk-int8:density=0.05")
