"""A ~5 MB model crosses the broker in chunks of at most 128 KiB, both ways, bit-exact;
duplicated and reordered chunks do no harm. Runs on the embedded broker and Mosquitto."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from coordinator.transport.base import Task
from takfl.config.base import ModelSpec
from takfl.wire.chunking import sha256, split
from takfl.wire.codec import apply_delta, encode_state, make_delta
from takfl.wire.messages import encode_chunk
from takfl.wire.topics import Up
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
CHUNK = 128 * 1024


def big_state(seed: int) -> dict[str, torch.Tensor]:
    """About 5 MiB of float32 plus an exact integer buffer."""
    g = torch.Generator().manual_seed(seed)
    state = {f"layer{i}.weight": torch.randn(256, 1024, generator=g) for i in range(5)}
    state["head.bias"] = torch.randn(10, generator=g)
    state["bn.num_batches_tracked"] = torch.tensor(41, dtype=torch.int64)
    return state


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


def task_for(agent: str, prototype: str, round_id: int, state: dict[str, torch.Tensor]) -> Task:
    return Task(
        round_id=round_id,
        prototype=prototype,
        client_id=agent,
        model=ModelSpec(builder="mlp_digits"),
        global_state=state,
        deadline=time.time() + 120,
        seed=3,
    )


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_five_megabyte_model_crosses_bit_exact_despite_duplicates(
    kind: str, tmp_path: Path
) -> None:
    registry = make_registry({"a1": "S"})
    base = big_state(0)
    with (
        running_broker(kind, tmp_path, agents=["a1"]) as broker,
        coordinator_transport(broker, registry, policy=FP32_TRANSPORT) as transport,
        agent_link(broker, registry["a1"]) as link,
    ):
        assert transport.wait_for_agents(["a1"], timeout=10)
        assert transport.clients() == {"S": ["a1"]}

        # coordinator -> agent: the global model, chunked
        transport.send_tasks([task_for("a1", "S", 1, base)])
        received = link.next_task(timeout=30)
        assert received is not None
        ref = received.message.blob
        assert ref.chunk_size == CHUNK
        assert ref.size > 5 * 1024 * 1024
        assert ref.count == math.ceil(ref.size / CHUNK) >= 40
        assert_bit_exact(received.global_state, base)

        # agent -> coordinator: a delta, chunks shuffled and duplicated
        g = torch.Generator().manual_seed(1)
        trained = {
            k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 2
            for k, v in base.items()
        }
        prepared = prepare_update(
            received.message,
            trained,
            received.global_state,
            secret=registry["a1"].secret,
            num_samples=7,
            metrics={"train_loss": 0.5},
            compression="fp32",
        )
        link.send_prepared(prepared, deadline=received.message.deadline, chunk_indices=[])
        chunks = split(prepared.blob, CHUNK)
        assert len(chunks) >= 40
        rng = random.Random(0)
        extra = rng.sample(chunks, k=len(chunks) // 2)
        stream = chunks + extra
        rng.shuffle(stream)
        topic = link.topics.up("a1", Up.CHUNK)
        for c in stream:
            assert len(c.payload) <= CHUNK
            link.client.publish(topic, encode_chunk(c))

        update = transport.next_update(timeout=30)
        assert update is not None
        assert (update.round_id, update.prototype, update.client_id, update.num_samples) == (
            1,
            "S",
            "a1",
            7,
        )
        assert update.metrics["train_loss"] == 0.5
        assert_bit_exact(update.state, apply_delta(base, make_delta(trained, base)))
        ack = link.wait_ack(prepared.header.blob.digest, timeout=10)
        assert ack is not None and ack.accepted

        stats = transport.receiver.stats("a1")
        assert stats is not None
        assert wait_until(
            lambda: stats.duplicates + transport.counters.ignored_chunks == len(extra), 10
        )
        assert sum(transport.counters.refused.values()) == 0
        assert transport.next_update(timeout=0.5) is None  # duplicates made no second update

        # the new global model is announced (retained) to the prototype's agents
        transport.publish_global(1, "S", update.state)
        announcement = link.wait_global(min_round=1, timeout=10)
        assert announcement is not None
        assert announcement.digest == sha256(encode_state(update.state, "fp32")).hex()
