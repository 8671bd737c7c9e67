"""The coordinator's transport with thousands of agents: a round's burst of tasks and
models is queued whole, never refused by the client's outbox."""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from coordinator.transport.base import Task
from coordinator.transport.mqtt import MqttTransport
from takfl.config.base import ModelSpec
from takfl.mqtt.client import MqttClient, MqttSettings
from tests.brokers import make_registry

OFFLINE = MqttSettings(port=1)  # never started: publishes wait in the outbox


def test_reserving_the_outbox_lets_a_burst_wait_and_never_shrinks_it() -> None:
    # Prepare
    client = MqttClient(replace(OFFLINE, outbox_size=2), "burst")

    # Execute
    size = client.reserve_outbox(5)
    queued = [client.publish("t/1", bytes([i])) for i in range(6)]
    kept = client.reserve_outbox(1)

    # Assert
    assert size == 5 and kept == 5
    assert queued == [True] * 5 + [False]
    assert client.counters.publish_refused == 1


def test_a_round_of_3000_tasks_and_models_is_queued_whole() -> None:
    # Prepare: 3,000 agents, each task followed by its model's chunk (default outbox: 4,096)
    registry = make_registry({f"S-{i:04d}": "S" for i in range(3_000)})
    transport = MqttTransport(OFFLINE, "unit", registry, num_classes=10, input_shape=(1, 8, 8))
    state = {"w": torch.zeros(8, 8), "b": torch.zeros(8)}
    tasks = [
        Task(
            round_id=0,
            prototype="S",
            client_id=agent,
            model=ModelSpec(builder="mlp_digits"),
            global_state=state,
            deadline=time.time() + 60,
        )
        for agent in registry
    ]

    # Execute
    transport.send_tasks(tasks)

    # Assert
    assert transport.client.counters.publish_refused == 0
