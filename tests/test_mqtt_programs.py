"""Training programs offered with tasks: an ExecuTorch agent fetches the program once by
chunk request and holds it by digest; a torch agent never fetches it. Embedded broker
and Mosquitto; the program here is opaque bytes (the transfer does not look inside)."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import pytest
import torch

from coordinator.transport.base import Task
from takfl.config.base import ModelSpec
from tests.brokers import (
    BROKER_KINDS,
    FAST_LINK,
    FAST_TRANSPORT,
    agent_link,
    coordinator_transport,
    make_registry,
    running_broker,
)

PROGRAM = bytes(range(256)) * 1200  # 300 KiB: three 128 KiB chunks


def task(agent: str, round_id: int) -> Task:
    state = {"w": torch.full((4, 4), float(round_id)), "b": torch.zeros(4)}
    return Task(
        round_id=round_id,
        prototype="S",
        client_id=agent,
        model=ModelSpec(builder="mlp_digits"),
        global_state=state,
        deadline=time.time() + 60,
        seed=1,
    )


@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_program_is_fetched_once_by_the_agent_that_trains_with_it(
    kind: str, tmp_path: Path
) -> None:
    # Prepare: a1 trains through ExecuTorch, a2 on torch
    registry = make_registry({"a1": "S", "a2": "S"})
    policy = dataclasses.replace(FAST_TRANSPORT, programs={"S": PROGRAM})
    with (
        running_broker(kind, tmp_path, agents=["a1", "a2"]) as broker,
        coordinator_transport(broker, registry, policy=policy) as transport,
        agent_link(
            broker, registry["a1"], policy=dataclasses.replace(FAST_LINK, programs=True)
        ) as et,
        agent_link(broker, registry["a2"]) as plain,
    ):
        assert transport.wait_for_agents(["a1", "a2"], 20)
        # Execute: two rounds
        resent = []
        for round_id in (1, 2):
            transport.send_tasks([task("a1", round_id), task("a2", round_id)])
            got, other = et.next_task(timeout=30), plain.next_task(timeout=30)
            # Assert: the program came with the ExecuTorch agent's task, verified
            assert got is not None and other is not None
            assert got.message.round_id == round_id
            assert got.program == PROGRAM
            assert got.message.program is not None
            assert got.message.program.digest == hashlib.sha256(PROGRAM).hexdigest()
            assert float(got.global_state["w"][0, 0]) == float(round_id)
            assert other.program is None and other.message.program is not None
            resent.append(transport.transport_counters.chunks_resent)
        # Fetched by request in round 1 (3 chunks, more only if a re-request raced);
        # held by digest for round 2, so nothing more was asked for
        assert resent[0] >= 3 and resent[1] == resent[0]
        assert hashlib.sha256(PROGRAM).hexdigest() in et.programs
        assert hashlib.sha256(PROGRAM).hexdigest() not in plain.programs
