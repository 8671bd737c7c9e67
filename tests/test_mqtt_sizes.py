"""Oversized messages are refused by both brokers (Mosquitto's max_packet_size, the
embedded broker's own limit) and, where a broker lets one through, by the client before
it is copied or handed to a handler."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.broker.mosquitto import conf_text
from takfl.mqtt.client import MqttClient
from takfl.wire.messages import CHUNK_HEADER_BYTES, MAX_CHUNK_BYTES, MAX_PACKET_BYTES
from takfl.wire.topics import Topics, Up
from tests.brokers import BROKER_KINDS, COORDINATOR_USER, running_broker

LIMIT = 256 * 1024  # broker packet limit in these tests


class Received:
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.cond = threading.Condition()

    def __call__(self, _topic: str, payload: bytes) -> None:
        with self.cond:
            self.sizes.append(len(payload))
            self.cond.notify_all()

    def wait_for(self, size: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: size in self.sizes, timeout)


def test_generated_mosquitto_conf_caps_message_and_packet_sizes(tmp_path: Path) -> None:
    text = conf_text(
        host="127.0.0.1",
        port=1883,
        passwords=tmp_path / "p",
        acl=tmp_path / "a",
        data=tmp_path,
        log_file=tmp_path / "l",
    )
    assert f"message_size_limit {MAX_CHUNK_BYTES + CHUNK_HEADER_BYTES}\n" in text
    assert f"max_packet_size {MAX_PACKET_BYTES}\n" in text


@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_broker_drops_a_message_over_its_limit(kind: str, tmp_path: Path) -> None:
    with running_broker(kind, tmp_path, agents=["a1", "a2"], max_packet_bytes=LIMIT) as broker:
        t = Topics(broker.fleet)
        got = Received()
        coord = MqttClient(broker.coordinator_settings, COORDINATOR_USER)
        coord.route(t.up_filter(Up.UPDATE), got)
        coord.start(timeout=10)
        big = MqttClient(replace(broker.settings_for("a1"), qos=0), "a1")
        big.start(timeout=10)
        small = MqttClient(broker.settings_for("a2"), "a2")
        small.start(timeout=10)
        try:
            big.publish(t.up("a1", Up.UPDATE), b"x" * (4 * LIMIT))
            small.publish(t.up("a2", Up.UPDATE), b"y" * 1000)
            assert got.wait_for(1000, timeout=10)
            assert not got.wait_for(4 * LIMIT, timeout=1.0)
            assert max(got.sizes) < LIMIT
        finally:
            for c in (small, big, coord):
                c.stop()


@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_client_drops_an_oversized_message_before_its_handler(kind: str, tmp_path: Path) -> None:
    with running_broker(kind, tmp_path, agents=["a1"]) as broker:
        t = Topics(broker.fleet)
        got = Received()
        coord = MqttClient(
            replace(broker.coordinator_settings, max_payload_bytes=4096), COORDINATOR_USER
        )
        coord.route(t.up_filter(Up.UPDATE), got)
        coord.start(timeout=10)
        agent = MqttClient(broker.settings_for("a1"), "a1")
        agent.start(timeout=10)
        try:
            agent.publish(t.up("a1", Up.UPDATE), b"x" * 100_000)
            agent.publish(t.up("a1", Up.UPDATE), b"y" * 100)
            assert got.wait_for(100, timeout=10)
            assert got.sizes == [100]
            assert coord.counters.oversized == 1
        finally:
            agent.stop()
            coord.stop()
