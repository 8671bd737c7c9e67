"""An agent's sample allowance: pinned by its first accepted registration (and written to
the registry file), so later claims above it are refused, over a real broker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from coordinator.registry import AllowanceBook, RegistryEntry, load_registry, save_registry
from coordinator.transport.base import Task
from takfl.config.base import ModelSpec
from takfl.wire.messages import encode_message
from takfl.wire.signing import sign
from takfl.wire.topics import Up
from takfl.wire.validation import Refusal
from tests.brokers import BROKER_KINDS, agent_link, coordinator_transport, running_broker
from tests.brokers import make_registry as wire_registry

torch.set_num_threads(1)


def test_allowance_book_pins_once_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "agents.json"
    records = [
        RegistryEntry(agent_id="a1", prototype="S", profile="phone", secret_hex="00" * 32),
        RegistryEntry(
            agent_id="a2", prototype="S", profile="phone", secret_hex="11" * 32, max_samples=7
        ),
    ]
    save_registry(path, records)
    book = AllowanceBook(path, load_registry(path))
    book.pin("a1", 12)
    book.pin("a1", 500)  # a second registration does not move it
    book.pin("a2", 500)  # nor does one of a provisioned allowance
    book.pin("ghost", 5)
    loaded = load_registry(path)
    assert loaded["a1"].max_samples == 12 and loaded["a2"].max_samples == 7
    assert set(loaded) == {"a1", "a2"}


@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_first_registration_pins_the_allowance(kind: str, tmp_path: Path) -> None:
    registry = wire_registry({"a1": "S"})
    pinned: list[tuple[str, int]] = []
    state = {"w": torch.ones(4, 4), "b": torch.zeros(4)}
    with (
        running_broker(kind, tmp_path, agents=["a1"]) as broker,
        coordinator_transport(broker, registry) as transport,
    ):
        transport.on_allowance = lambda a, n: pinned.append((a, n))
        with agent_link(broker, registry["a1"], num_samples=10) as link:
            assert transport.wait_for_agents(["a1"], timeout=20)
            assert pinned == [("a1", 10)]
            assert transport.registry["a1"].max_samples == 10

            # a re-registration claiming more is refused; the allowance stays
            bigger = sign(
                link.registration().model_copy(update={"num_samples": 11}), link.identity.secret
            )
            link.client.publish(link.topics.up("a1", Up.REGISTER), encode_message(bigger))
            deadline = time.monotonic() + 20
            while transport.counters.refused[Refusal.SAMPLE_CAP.value] < 1:
                assert time.monotonic() < deadline, transport.counters
                time.sleep(0.1)
            assert transport.registry["a1"].max_samples == 10

            # an update claiming more than the allowance is refused with its own reason
            transport.send_tasks(
                [
                    Task(
                        round_id=1,
                        prototype="S",
                        client_id="a1",
                        model=ModelSpec(builder="mlp_digits"),
                        global_state=state,
                        deadline=time.time() + 60,
                    )
                ]
            )
            task = link.next_task(timeout=30)
            assert task is not None
            trained = {k: v + 0.01 for k, v in state.items()}
            header = link.send_update(task, trained, num_samples=11)
            ack = link.wait_ack(header.blob.digest, timeout=30)
            assert ack is not None and not ack.accepted and ack.reason == "sample_cap"
            honest = {k: v + 0.02 for k, v in state.items()}  # another blob: its own decision
            header = link.send_update(task, honest, num_samples=10)
            ack = link.wait_ack(header.blob.digest, timeout=30)
            assert ack is not None and ack.accepted
            assert transport.next_update(timeout=10) is not None
