"""The broker restarts in the middle of an update transfer: both ends reconnect, the
coordinator asks again for the chunks it lacks, and the update arrives bit-exact."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from coordinator.transport.base import Task
from takfl.config.base import ModelSpec
from takfl.wire.codec import apply_delta, make_delta
from takfl.wire.update import prepare_update
from tests.brokers import (
    BROKER_KINDS,
    FP32_TRANSPORT,
    agent_link,
    coordinator_transport,
    make_registry,
    running_broker,
)

torch.set_num_threads(1)


def model_state(seed: int) -> dict[str, torch.Tensor]:
    """About 2.5 MiB: 20 chunks of 128 KiB."""
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.weight": torch.randn(640, 1024, generator=g),
        "enc.bias": torch.zeros(640),
        "bn.num_batches_tracked": torch.tensor(9, dtype=torch.int64),
    }


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_update_transfer_completes_across_a_broker_restart(kind: str, tmp_path: Path) -> None:
    registry = make_registry({"a1": "S"})
    base = model_state(0)
    with (
        running_broker(kind, tmp_path, agents=["a1"]) as broker,
        coordinator_transport(broker, registry, policy=FP32_TRANSPORT) as transport,
        agent_link(broker, registry["a1"]) as link,
    ):
        assert transport.wait_for_agents(["a1"], timeout=10)
        transport.send_tasks(
            [
                Task(
                    round_id=4,
                    prototype="S",
                    client_id="a1",
                    model=ModelSpec(builder="mlp_digits"),
                    global_state=base,
                    deadline=time.time() + 120,
                )
            ]
        )
        task = link.next_task(timeout=30)
        assert task is not None
        g = torch.Generator().manual_seed(1)
        trained = {
            k: v + torch.randn(v.shape, generator=g) * 1e-3 if v.is_floating_point() else v + 1
            for k, v in base.items()
        }
        up = prepare_update(
            task.message,
            trained,
            task.global_state,
            secret=registry["a1"].secret,
            num_samples=3,
            compression="fp32",
        )
        count = up.header.blob.count
        assert count >= 20

        # the first half goes out, then the broker goes down; the rest was never sent
        link.send_prepared(up, deadline=task.message.deadline, chunk_indices=range(count // 2))
        assert wait_until(lambda: transport.pending_transfers() == 1, 10)
        broker.restart()

        update = transport.next_update(timeout=40)
        assert update is not None and update.client_id == "a1"
        want = apply_delta(base, make_delta(trained, base))
        assert all(torch.equal(update.state[k], v) for k, v in want.items())
        ack = link.wait_ack(up.header.blob.digest, timeout=20)
        assert ack is not None and ack.accepted
        assert transport.counters.chunk_requests_sent >= 1
        assert link.counters.requests_answered >= 1
        assert transport.client.counters.disconnects >= 1
        assert link.client.counters.disconnects >= 1
        assert transport.wait_for_agents(["a1"], timeout=10)  # presence restored
        assert sum(transport.counters.refused.values()) == 0
