"""The paho client layer on real brokers: bounded queues, last will, persistent
sessions (MQTT 3.1.1 and 5), backoff."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pytest

from takfl.mqtt.client import MqttClient, MqttSettings, Will, backoff_delay
from takfl.wire.messages import Status, decode_message, encode_message
from takfl.wire.topics import Topics, Up
from tests.brokers import (
    COORDINATOR_USER,
    EMBEDDED,
    MOSQUITTO,
    SKIP_NO_MOSQUITTO,
    BrokerHandle,
    running_broker,
)

SETTINGS = MqttSettings(keepalive_s=5, reconnect_min_s=1, reconnect_max_s=2)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerHandle]:
    with running_broker(EMBEDDED, tmp_path, agents=["a1"]) as b:
        yield b


def test_full_inbox_holds_the_broker_back_and_loses_nothing(broker: BrokerHandle) -> None:
    release = threading.Event()
    handled: list[bytes] = []

    def slow(_topic: str, payload: bytes) -> None:
        release.wait(10)
        handled.append(payload)

    topics = Topics(broker.fleet)
    sub = MqttClient(replace(broker.coordinator_settings, inbox_size=2), COORDINATOR_USER)
    sub.route(topics.up_filter(Up.UPDATE), slow)
    sub.start(timeout=10)
    pub = MqttClient(broker.settings_for("a1"), "a1")
    pub.start(timeout=10)
    try:
        for i in range(8):
            pub.publish(topics.up("a1", Up.UPDATE), bytes([i]))
        end = time.monotonic() + 10
        while sub.counters.inbox_waits < 1 and time.monotonic() < end:
            time.sleep(0.05)
        assert sub.counters.inbox_waits >= 1  # one in the handler, two queued, one waiting
        release.set()
        end = time.monotonic() + 10
        while len(handled) < 8 and time.monotonic() < end:
            time.sleep(0.05)
        assert sorted(handled) == [bytes([i]) for i in range(8)]
        assert sub.counters.dropped == 0
    finally:
        pub.stop()
        sub.stop()


def message(n: int) -> tuple[Any, str, bytes, int, int]:
    return (lambda _t, _p: None, "t/1", bytes([n]), n, 1)


def test_a_full_inbox_makes_the_network_thread_wait_for_room() -> None:
    # Prepare
    client = MqttClient(replace(SETTINGS, port=1, inbox_size=1), "held")  # never started
    client._hold(message(1))
    waiting = threading.Thread(target=client._hold, args=(message(2),))

    # Execute
    waiting.start()
    waiting.join(0.3)
    held = waiting.is_alive()
    first = client._inbox.get_nowait()
    waiting.join(5)

    # Assert
    assert held and not waiting.is_alive()
    assert first[2] == b"\x01" and client._inbox.get_nowait()[2] == b"\x02"
    assert client.counters.inbox_waits == 1 and client.counters.dropped == 0


def test_a_stopping_client_drops_what_it_cannot_queue() -> None:
    # Prepare
    client = MqttClient(replace(SETTINGS, port=1, inbox_size=1), "stopping")  # never started
    client._hold(message(1))
    client._stopping.set()

    # Execute
    client._hold(message(2))

    # Assert
    assert client.counters.dropped == 1 and client._inbox.qsize() == 1


def test_full_outbox_refuses_and_counts() -> None:
    client = MqttClient(replace(SETTINGS, port=1, outbox_size=2), "offline")  # never started
    assert client.publish("t/1", b"a") and client.publish("t/1", b"b")
    assert not client.publish("t/1", b"c")
    assert client.counters.publish_refused == 1


def test_last_will_marks_a_vanished_client_offline(broker: BrokerHandle) -> None:
    seen: list[Status] = []
    got = threading.Event()

    def on_status(_topic: str, payload: bytes) -> None:
        seen.append(decode_message(Status, payload))
        got.set()

    topics = Topics(broker.fleet)
    watcher = MqttClient(broker.coordinator_settings, COORDINATOR_USER)
    watcher.route(topics.up_filter(Up.STATUS), on_status)
    watcher.start(timeout=10)
    offline = encode_message(Status(agent_id="a1", state="offline", time=0.0))
    doomed = MqttClient(
        broker.settings_for("a1"), "a1", will=Will(topics.up("a1", Up.STATUS), offline)
    )
    doomed.start(timeout=10)
    try:
        doomed._client.loop_stop()  # vanish without DISCONNECT: the broker sends the will
        sock = doomed._client.socket()
        assert sock is not None
        sock.close()
        assert got.wait(15)
        assert seen[-1].agent_id == "a1" and seen[-1].state == "offline"
    finally:
        watcher.stop()


@pytest.mark.parametrize("seed", range(5))
def test_backoff_grows_with_jitter_within_bounds(seed: int) -> None:
    rng = random.Random(seed)
    delays = [[backoff_delay(n, 1, 30, rng) for n in range(1, 9)] for _ in range(20)]
    for run in delays:
        for n, d in enumerate(run, start=1):
            cap = min(30, 2 ** (n - 1))
            assert max(1, round(cap / 2)) <= d <= cap
    assert len({tuple(run) for run in delays}) > 1  # jitter: not every run identical


@SKIP_NO_MOSQUITTO
@pytest.mark.mosquitto
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_persistent_session_keeps_messages_while_away(
    tmp_path: Path, protocol: Literal["3.1.1", "5"]
) -> None:
    with running_broker(MOSQUITTO, tmp_path, agents=["a1"]) as broker:
        topics = Topics(broker.fleet)
        coord_settings = replace(broker.coordinator_settings, protocol=protocol)
        got: list[bytes] = []
        arrived = threading.Event()

        def on_update(_topic: str, payload: bytes) -> None:
            got.append(payload)
            arrived.set()

        first = MqttClient(coord_settings, COORDINATOR_USER)
        first.route(topics.up_filter(Up.UPDATE), on_update)
        first.start(timeout=10)
        first.stop()  # away; the session (and its subscription) stays on the broker
        agent = MqttClient(replace(broker.settings_for("a1"), protocol=protocol), "a1")
        agent.start(timeout=10)
        try:
            agent.publish(topics.up("a1", Up.UPDATE), b"sent while away")
            time.sleep(0.3)
            back = MqttClient(coord_settings, COORDINATOR_USER)
            back.route(topics.up_filter(Up.UPDATE), on_update)
            back.start(timeout=10)
            try:
                assert arrived.wait(10)
                assert got == [b"sent while away"]
            finally:
                back.stop()
        finally:
            agent.stop()


def test_the_outbox_can_grow_on_an_open_connection(broker: BrokerHandle) -> None:
    # Prepare
    client = MqttClient(replace(broker.coordinator_settings, outbox_size=2), COORDINATOR_USER)
    client.start(timeout=10)
    try:
        # Execute
        size = client.reserve_outbox(10_000)
        sent = [client.publish("takfl/unit/x", bytes([i])) for i in range(50)]
    finally:
        client.stop()

    # Assert
    assert size == 10_000 and all(sent)
