"""Rate limits per agent on registrations and statuses (so on presence changes): a flood
from one provisioned agent's own topics is dropped before it is queued, counted, logged
once a window, and leaves the coordinator's queues and telemetry log alone."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

from coordinator.store import RunStore
from coordinator.telemetry_log import TelemetryRecorder
from coordinator.transport.mqtt import MqttTransport
from coordinator.transport.presence import PresenceGate
from takfl.mqtt.client import MqttSettings
from takfl.mqtt.ratelimit import MessageLimiter, MessageLimits
from takfl.wire.messages import Status, encode_message
from takfl.wire.signing import sign
from takfl.wire.topics import Topics, Up
from tests.brokers import COORDINATOR_USER, FAST_TRANSPORT, agent_link, running_broker
from tests.brokers import make_registry as wire_registry

torch.set_num_threads(1)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_limiter_admits_a_bucket_per_key_and_refills_over_the_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    clock = Clock()
    limiter = MessageLimiter("registrations", MessageLimits(window_s=60, per_window=3), clock=clock)
    # Execute
    with caplog.at_level(logging.WARNING):
        first = [limiter.allow("a1") for _ in range(10)]
        other = limiter.allow("a2")
        clock.now = 20.0  # a third of the window: one token back
        later = [limiter.allow("a1") for _ in range(3)]
        clock.now = 90.0  # a new window: logged again
        limiter.allow("a1")
        flood = [limiter.allow("a1") for _ in range(5)]
    # Assert
    assert first == [True] * 3 + [False] * 7 and other
    assert later == [True, False, False]
    assert flood.count(True) <= 3
    logged = [r for r in caplog.records if "registrations from a1" in r.getMessage()]
    assert len(logged) == 2  # once per window, not once per message
    assert limiter.dropped["a1"] == 7 + 2 + flood.count(False) and limiter.total_dropped > 9


def test_gate_keys_on_the_topics_agent() -> None:
    clock = Clock()
    topics = Topics("unit")
    gate = PresenceGate(
        topics, MessageLimits(per_window=1), MessageLimits(per_window=2), clock=clock
    )
    assert gate.registration(topics.up("a1", Up.REGISTER))
    assert not gate.registration(topics.up("a1", Up.REGISTER))
    assert gate.registration(topics.up("a2", Up.REGISTER))
    assert [gate.status(topics.up("a1", Up.STATUS)) for _ in range(3)] == [True, True, False]
    assert gate.registration("takfl/unit/nobody")  # names no agent: refused downstream


@pytest.mark.slow  # a real broker and seconds of waiting: the full suite runs it
def test_a_flood_of_signed_registrations_and_statuses_is_dropped_unread(tmp_path: Path) -> None:
    # Prepare: a1 floods with its own secret; a2 is honest
    registry = wire_registry({"a1": "S", "a2": "S"})
    store = RunStore(tmp_path / "run")
    store.root.mkdir()
    with (
        running_broker("embedded", tmp_path, agents=["a1", "a2"]) as broker,
        MqttTransport(
            broker.coordinator_settings,
            broker.fleet,
            registry,
            num_classes=10,
            input_shape=(1, 8, 8),
            policy=FAST_TRANSPORT,
            client_id=COORDINATOR_USER,
            observer=TelemetryRecorder(store),
        ).start(timeout=10) as transport,
        agent_link(broker, registry["a1"]) as attacker,
    ):
        assert transport.wait_for_agents(["a1"], timeout=20)
        topics, secret = attacker.topics, registry["a1"].secret
        before = transport.client.counters.received
        n_reg, n_status = 3000, 300
        # Execute: registrations claiming another agent's id, statuses flapping
        for _ in range(n_reg):
            forged = attacker.registration().model_copy(update={"agent_id": "a2"})
            attacker.client.publish(
                topics.up("a1", Up.REGISTER), encode_message(sign(forged, secret))
            )
        t0 = time.time()
        for i in range(n_status):
            state = "online" if i % 2 else "offline"
            status = sign(Status(agent_id="a1", state=state, time=t0 + i), secret)
            attacker.client.publish(topics.up("a1", Up.STATUS), encode_message(status))
        deadline = time.monotonic() + 120
        while transport.client.counters.received < before + n_reg + n_status:
            assert time.monotonic() < deadline, transport.client.counters
            time.sleep(0.2)
        time.sleep(1.0)  # let the dispatcher finish what was queued
        # an honest agent still gets in at once
        with agent_link(broker, registry["a2"]):
            assert transport.wait_for_agents(["a2"], timeout=20)
        # Assert
        counters = transport.transport_counters
        assert transport.client.counters.dropped == 0  # the shared inbox never filled
        assert counters.registrations_dropped >= n_reg - 20
        assert counters.statuses_dropped >= n_status - 40
        assert transport.counters.refused["malformed"] <= 20
    presence = [e for e in store.telemetry() if e["kind"] == "presence" and e["agent_id"] == "a1"]
    assert len(presence) <= 42, len(presence)


def test_a_fleet_larger_than_the_default_bucket_count_keeps_every_agents_limit() -> None:
    # Prepare: 6,000 provisioned agents (default: 4,096 buckets); a1 used up its budget
    n = 6_000
    registry = wire_registry({f"a{i}": "S" for i in range(n)})
    transport = MqttTransport(  # never started: only its units are used
        MqttSettings(port=1), "unit", registry, num_classes=10, input_shape=(1, 8, 8)
    )
    gate, topics = transport.gate, transport.topics
    while gate.registration(topics.up("a1", Up.REGISTER)):
        pass

    # Execute: every other agent registers once, then a1 tries again
    for i in range(2, n):
        gate.registration(topics.up(f"a{i}", Up.REGISTER))
    again = gate.registration(topics.up("a1", Up.REGISTER))

    # Assert
    assert not again
    assert transport.sender.limiter.limits.max_keys >= 3 * n
    assert transport.intake.memory >= 2 * n
