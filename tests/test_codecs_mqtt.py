"""Sub-byte codecs between a coordinator's MQTT transport and agents' links over a real
broker (embedded and Mosquitto): sign updates with error feedback up, rotated 2-bit
deltas of the global down, agents restarting with and without their codec state."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from coordinator.transport.base import Task
from edge_agent.codec_state import CodecState
from takfl.config.base import ModelSpec
from takfl.config.profile import CommsSpec
from takfl.state import State
from takfl.wire.downlink import full_blob, model_digest
from tests.brokers import (
    BROKER_KINDS,
    FAST_TRANSPORT,
    agent_link,
    coordinator_transport,
    make_registry,
    running_broker,
)

torch.set_num_threads(1)
POLICY = replace(
    FAST_TRANSPORT, comms=CommsSpec(compression="sign1:density=0.6", downstream="rot2")
)


def glob(seed: int) -> State:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(64, 64, generator=g),
        "fc.bias": torch.randn(64, generator=g),
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
    }


def trained(state: State, seed: int) -> State:
    g = torch.Generator().manual_seed(100 + seed)
    return {
        k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 1
        for k, v in state.items()
    }


def task(agent: str, round_id: int, state: State) -> Task:
    return Task(
        round_id=round_id,
        prototype="S",
        client_id=agent,
        model=ModelSpec(builder="mlp_digits"),
        global_state=state,
        deadline=time.time() + 120,
        seed=round_id,
    )


@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_deltas_go_down_residuals_persist_and_a_lost_model_is_sent_in_full(
    kind: str, tmp_path: Path
) -> None:
    registry = make_registry({"a1": "S", "a2": "S"})
    folders = {a: tmp_path / a for a in registry}
    full_size = len(full_blob(glob(0)))
    with (
        running_broker(kind, tmp_path, agents=list(registry)) as broker,
        coordinator_transport(broker, registry, policy=POLICY) as transport,
    ):
        # Round 1: nothing held, so the full model; sign updates go up
        with (
            agent_link(broker, registry["a1"], codec_state=CodecState(folders["a1"])) as l1,
            agent_link(broker, registry["a2"], codec_state=CodecState(folders["a2"])) as l2,
        ):
            assert transport.wait_for_agents(list(registry), timeout=15)
            transport.send_tasks([task(a, 1, glob(0)) for a in registry])
            for i, link in enumerate((l1, l2)):
                got = link.next_task(timeout=30)
                assert got is not None and got.message.base is None
                assert got.message.blob.size == full_size
                header = link.send_update(got, trained(got.global_state, i), num_samples=5)
                assert header.compression == "sign1:block=256,density=0.6"
                assert header.blob.size < 0.05 * full_size
            first = [transport.next_update(timeout=30) for _ in registry]
            assert all(u is not None for u in first)

        # Both agents restart; a2 lost its state on the way
        shutil.rmtree(folders["a2"])
        new_global = trained(glob(0), 7)
        with (
            agent_link(broker, registry["a1"], codec_state=CodecState(folders["a1"])) as l1,
            agent_link(broker, registry["a2"], codec_state=CodecState(folders["a2"])) as l2,
        ):
            assert transport.wait_for_agents(list(registry), timeout=15)
            # a1's residual survived the restart; a2 starts without one
            assert l1.codec_state.residual(transport.run_id, "S") is not None
            assert l2.codec_state.residual(transport.run_id, "S") is None
            transport.send_tasks([task(a, 2, new_global) for a in registry])

            kept = l1.next_task(timeout=30)
            assert kept is not None and kept.message.base is not None
            assert kept.message.blob.size < 0.1 * full_size  # a 2-bit delta
            assert model_digest(kept.global_state) == kept.message.model_digest
            # a lossy copy of the coordinator's global, not the global itself
            err = (kept.global_state["fc.weight"] - new_global["fc.weight"]).norm()
            assert 0 < err < 0.5 * (new_global["fc.weight"] - glob(0)["fc.weight"]).norm()

            lost = l2.next_task(timeout=30)  # refused the delta, got the full model
            assert lost is not None and lost.message.base is None
            assert lost.message.blob.size == full_size
            assert transport.transport_counters.full_resends == 1

            for i, (link, got) in enumerate(((l1, kept), (l2, lost))):
                link.send_update(got, trained(got.global_state, 10 + i), num_samples=5)
            second = [transport.next_update(timeout=30) for _ in registry]
            assert all(u is not None and u.round_id == 2 for u in second)
            assert transport.counters.accepted == 4
