"""Protocol 1.0's operations over a real Mosquitto: monitors share a login with client ids
of their own while agents stay protected from a client-id takeover; the previous run's
update headers, delivered by a persistent session, are refused as ``other_run`` (no
``future_round`` noise); an update after the last round is answered ``run_finished``;
no retained message outlives its meaning; an agent of another major version is told so,
prints it and exits 3."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from coordinator.transport.base import Task
from edge_agent.link import REGISTER_KEY
from takfl.config.base import ModelSpec
from takfl.mqtt.client import MqttClient, MqttConnectError, MqttSettings, unique_client_id
from takfl.secret_files import write_secret_file
from takfl.wire.messages import Registration, encode_message
from takfl.wire.signing import sign
from takfl.wire.topics import Down, Topics, Up
from tests.brokers import (
    FAST_TRANSPORT,
    MOSQUITTO,
    SKIP_NO_MOSQUITTO,
    agent_link,
    coordinator_transport,
    make_registry,
    running_broker,
)

pytestmark = [pytest.mark.mosquitto, SKIP_NO_MOSQUITTO]
torch.set_num_threads(1)


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def task_for(agent: str, round_id: int = 1) -> Task:
    g = torch.Generator().manual_seed(round_id)
    state = {"w": torch.randn(32, 16, generator=g), "b": torch.zeros(32)}
    return Task(
        round_id=round_id,
        prototype="S",
        client_id=agent,
        model=ModelSpec(builder="mlp_digits"),
        global_state=state,
        deadline=time.time() + 120,
    )


def retained(settings: MqttSettings, topic_filter: str, listen_s: float = 2.0) -> list[str]:
    """Topics with a retained message under ``topic_filter``, as a fresh subscriber sees."""
    seen: list[str] = []
    client = MqttClient(settings, unique_client_id("probe"), persistent=False)
    client.route(topic_filter, lambda topic, _payload: seen.append(topic))
    client.start(timeout=10)
    time.sleep(listen_s)
    client.stop()
    return seen


@pytest.mark.slow  # a real broker and seconds of waiting: the full suite runs it
def test_monitors_share_a_login_and_agents_cannot_take_each_others_session(
    tmp_path: Path,
) -> None:
    with running_broker(MOSQUITTO, tmp_path, agents=["a1", "a2"], service=True) as broker:
        monitor = broker.monitor_settings
        assert monitor is not None
        # Execute: two monitors with one login on the service listener; agent a2 asks
        # for a1's client id on the agents' listener
        monitors = [MqttClient(monitor, unique_client_id("takfl-monitor"), persistent=False)]
        monitors.append(MqttClient(monitor, unique_client_id("takfl-monitor"), persistent=False))
        a1 = MqttClient(broker.settings_for("a1"), "a1")
        impostor = MqttClient(broker.settings_for("a2"), "a1")
        for client in (*monitors, a1, impostor):
            client.start(timeout=10)
        try:
            time.sleep(4.0)
            # Assert: nobody was cut off; the impostor got a session of its own login
            for client in (*monitors, a1):
                assert client.is_connected
                assert (client.counters.connects, client.counters.disconnects) == (1, 0)
        finally:
            for client in (*monitors, a1, impostor):
                client.stop()
        # an agent cannot log in on the service listener at all
        as_agent = replace(broker.settings_for("a1"), port=monitor.port)
        with pytest.raises(MqttConnectError):
            MqttClient(as_agent, "a1", persistent=False).start(timeout=5)


def test_the_previous_runs_headers_are_other_run_not_future_round(tmp_path: Path) -> None:
    registry = make_registry({"a1": "S"})
    with (
        running_broker(MOSQUITTO, tmp_path, agents=["a1"]) as broker,
        agent_link(broker, registry["a1"]) as link,
    ):
        # Prepare: run A sends a task, and goes away (its session stays on the broker)
        with coordinator_transport(broker, registry) as first:
            assert first.wait_for_agents(["a1"], timeout=15)
            first.send_tasks([task_for("a1")])
            task = link.next_task(timeout=30)
            assert task is not None and task.message.run == first.run_id
        # the agent answers while no coordinator is connected: queued in its session
        trained = {k: v + 0.01 for k, v in task.global_state.items()}
        header = link.send_update(task, trained, num_samples=5)
        # Execute: a new run starts under the same client id and session
        with coordinator_transport(broker, registry) as second:
            ack = link.wait_ack(header.blob.digest, timeout=30)
            # Assert: recognised, answered, never acted on
            assert ack is not None and (ack.accepted, ack.reason) == (False, "other_run")
            assert ack.run == first.run_id != second.run_id
            refused = dict(second.counters.refused)
            assert refused == {"other_run": 1}, refused
            assert second.next_update(timeout=0.5) is None


def test_an_update_after_the_last_round_is_answered_run_finished(tmp_path: Path) -> None:
    registry = make_registry({"a1": "S"})
    with (
        running_broker(MOSQUITTO, tmp_path, agents=["a1"]) as broker,
        coordinator_transport(broker, registry) as transport,
        agent_link(broker, registry["a1"]) as link,
    ):
        assert transport.wait_for_agents(["a1"], timeout=15)
        transport.send_tasks([task_for("a1")])
        task = link.next_task(timeout=30)
        assert task is not None
        transport.finish(grace_s=0.0)  # the run ends
        trained = {k: v + 0.01 for k, v in task.global_state.items()}
        header = link.send_update(task, trained, num_samples=5)
        ack = link.wait_ack(header.blob.digest, timeout=30)
        assert ack is not None and (ack.accepted, ack.reason) == (False, "run_finished")
        assert transport.next_update(timeout=0.5) is None


@pytest.mark.slow  # a real broker and seconds of waiting: the full suite runs it
def test_no_retained_message_outlives_its_meaning(tmp_path: Path) -> None:
    registry = make_registry({"a1": "S"})
    t = Topics("test")
    with running_broker(MOSQUITTO, tmp_path, agents=["a1"]) as broker:
        # Prepare: a retained registration from an older agent, a previous run's globals
        old = MqttClient(broker.settings_for("a1"), "a1", persistent=False)
        old.start(timeout=10)
        legacy = b'{"schema":1,"kind":"register","agent_id":"a1"}'
        old.publish(t.up("a1", Up.REGISTER), legacy, retain=True)
        old.stop()
        coord = broker.coordinator_settings
        with coordinator_transport(broker, registry) as first:
            # the legacy registration is refused (no protocol version) and cleared
            assert wait_until(lambda: first.counters.refused["malformed"] >= 1, 10)
            first.publish_global(1, "S", task_for("a1").global_state)
        assert len(retained(coord, t.global_model("S"))) == 1
        # Execute: a new run starts; an agent registers
        with (
            coordinator_transport(broker, registry) as second,
            agent_link(broker, registry["a1"]) as link,
        ):
            second.clear_globals(["S"])
            ack = link.wait_ack(REGISTER_KEY, timeout=15)
            assert ack is not None and ack.accepted
            # Assert: the legacy registration is gone, no registration is retained, the
            # previous run's announcements are cleared; the agent's presence stays
            assert retained(coord, t.up_filter(Up.REGISTER)) == []
            assert retained(coord, t.global_model("S")) == []
            assert retained(coord, t.down("a1", Down.GLOBAL)) == []
            assert retained(coord, t.up("a1", Up.STATUS)) == [t.up("a1", Up.STATUS)]


def test_a_stale_or_replayed_registration_is_not_answered(tmp_path: Path) -> None:
    registry = make_registry({"a1": "S"})
    t = Topics("test")
    with (
        running_broker(MOSQUITTO, tmp_path, agents=["a1"]) as broker,
        coordinator_transport(broker, registry) as transport,
        agent_link(broker, registry["a1"]) as link,
    ):
        assert link.wait_ack(REGISTER_KEY, timeout=15) is not None
        before = transport.transport_counters.registrations
        reg = sign(
            Registration(
                agent_id="a1",
                prototype="S",
                profile="p",
                hardware_class="phone",
                num_samples=10,
                sent_at=time.time() - 3600,
            ),
            registry["a1"].secret,
        )
        payload = encode_message(link.registration())
        for message in (encode_message(reg), payload, payload):  # stale; fresh; replayed
            link.client.publish(t.up("a1", Up.REGISTER), message)
        assert wait_until(lambda: transport.counters.refused["replayed"] == 1, 15)
        assert transport.counters.refused["stale_message"] == 1
        assert transport.transport_counters.registrations == before + 1


@pytest.mark.slow  # a real broker and seconds of waiting: the full suite runs it
def test_an_agent_of_another_major_version_is_told_and_exits_3(tmp_path: Path) -> None:
    # Prepare: an agent process speaking protocol 2.0 (a test double), provisioned as S-000
    registry = make_registry({"S-000": "S"})
    secret_file = tmp_path / "S-000.secret"
    write_secret_file(secret_file, registry["S-000"].secret)
    with (
        running_broker(MOSQUITTO, tmp_path, agents=["S-000"]) as broker,
        coordinator_transport(broker, registry, policy=FAST_TRANSPORT) as transport,
    ):
        settings = broker.settings_for("S-000")
        password_file = tmp_path / "broker.password"
        password_file.write_text(str(settings.password))
        password_file.chmod(0o600)
        command = [
            *(sys.executable, "-m", "tests.protocol_double", "2.0", "edge_agent.cli", "run"),
            *("--profile", "raspberry-pi-4", "--federation", "digits", "--demo-shard", "0"),
            *("--broker", f"mqtt://S-000@127.0.0.1:{broker.port}", "--mqtt-protocol", "3.1.1"),
            *("--password-file", str(password_file), "--id", "S-000", "--fleet", broker.fleet),
            *("--secret-file", str(secret_file), "--threads", "1"),
        ]
        # Execute
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        # Assert: refused by name, with the coordinator's versions; a clean exit 3
        out = done.stdout + done.stderr
        assert done.returncode == 3, out
        assert "unsupported_version" in out and "speaks protocol 1.0" in out, out
        assert transport.counters.refused["unsupported_version"] >= 1
        assert transport.clients() == {}
