"""An agent refuses a non-finite or mismatched global model and keeps serving tasks.

A real agent (``edge_agent.runner.Agent``, in a thread) and the coordinator's MQTT
transport over a real broker; the coordinator sends a NaN global, then one with the
wrong shapes, then a good one, which the agent trains and answers.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from coordinator.transport.base import Task
from edge_agent.runner import Agent
from takfl.config import load_profile
from takfl.config.base import ModelSpec
from takfl.data import load_digits
from takfl.models import build_model
from tests.brokers import BROKER_KINDS, coordinator_transport, make_registry, running_broker

torch.set_num_threads(1)


def task(round_id: int, state: dict[str, torch.Tensor]) -> Task:
    return Task(
        round_id=round_id,
        prototype="S",
        client_id="a1",
        model=ModelSpec(builder="mlp_digits", args={"width": 8}),
        global_state=state,
        deadline=time.time() + 120,
    )


@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_agent_refuses_poisoned_globals_and_stays_up(kind: str, tmp_path: Path) -> None:
    registry = make_registry({"a1": "S"})
    phone = load_profile("android-phone")  # on torch: these tasks offer no training program
    profile = phone.model_copy(
        update={"training": phone.training.model_copy(update={"backend": "torch"})}
    )
    digits = load_digits()
    x, y = digits.x[:40], digits.y[:40]
    good = build_model("mlp_digits", 10, (1, 8, 8), width=8).state_dict()
    nan = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in good.items()
    }
    wrong = build_model("mlp_digits", 10, (1, 8, 8), width=16).state_dict()
    with (
        running_broker(kind, tmp_path, agents=["a1"]) as broker,
        coordinator_transport(broker, registry) as transport,
    ):
        rec = registry["a1"]
        agent = Agent(
            profile,
            broker.settings_for("a1"),
            broker.fleet,
            "a1",
            rec.secret,
            x,
            y,
            report=lambda m: None,
        )
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        try:
            assert transport.wait_for_agents(["a1"], timeout=30)
            # one poisoned global at a time: a newer round's task may supersede an older one
            transport.send_tasks([task(1, nan)])
            end = time.monotonic() + 60
            while agent.link.counters.blob_errors < 1 and time.monotonic() < end:
                time.sleep(0.1)
            transport.send_tasks([task(2, wrong)])
            end = time.monotonic() + 60
            while agent.stats.tasks_refused < 1 and time.monotonic() < end:
                time.sleep(0.1)
            transport.send_tasks([task(3, good)])
            update = None
            end = time.monotonic() + 120
            while update is None and time.monotonic() < end:
                update = transport.next_update(timeout=1.0)
            assert update is not None and update.round_id == 3
            assert thread.is_alive()
            assert agent.stats.tasks_done == 1
            assert agent.stats.tasks_refused == 1  # the shape mismatch, in the runner
            assert agent.link.counters.blob_errors == 1  # the NaN global, in the link
        finally:
            agent.stop_event.set()
            thread.join(30)
