"""With the fleet's logins and ACL, an agent can neither publish on another agent's topics
nor read another agent's tasks, and a client without credentials cannot connect: on the
generated Mosquitto configuration and on the embedded broker alike."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from takfl.mqtt.client import MqttClient, MqttConnectError, MqttSettings
from takfl.wire.topics import Down, Topics, Up
from tests.brokers import BROKER_KINDS, COORDINATOR_USER, running_broker


class Inbox:
    """Payloads received by a client, with a bounded wait."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()

    def put(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self.items.append((topic, payload))
            self._cond.notify_all()

    def payloads(self) -> list[bytes]:
        with self._cond:
            return [p for _, p in self.items]

    def wait_for(self, payload: bytes, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: payload in [p for _, p in self.items], timeout)


@contextmanager
def connected(
    settings: MqttSettings, client_id: str, routes: list[tuple[str, Inbox]]
) -> Iterator[MqttClient]:
    client = MqttClient(settings, client_id)
    for topic_filter, inbox in routes:
        client.route(topic_filter, inbox.put)
    client.start(timeout=10)
    try:
        yield client
    finally:
        client.stop()


@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_agents_are_confined_to_their_own_topics(kind: str, tmp_path: Path) -> None:
    with running_broker(kind, tmp_path, agents=["a1", "a2"]) as broker:
        t = Topics(broker.fleet)
        coord_in, a1_in, a2_in = Inbox(), Inbox(), Inbox()
        with (
            connected(
                broker.coordinator_settings, COORDINATOR_USER, [(t.fleet_filter(), coord_in)]
            ) as coord,
            connected(
                broker.settings_for("a1"),
                "a1",
                [
                    (t.down("a1", Down.TASK), a1_in),
                    (t.down("a2", Down.TASK), a1_in),
                    (t.up("a2", Up.UPDATE), a1_in),
                ],
            ) as a1,
            connected(broker.settings_for("a2"), "a2", [(t.down("a2", Down.TASK), a2_in)]),
        ):
            # a1 tries to write where it must not, then writes on its own topic;
            # mosquitto handles one client's messages in order
            forged = [
                (t.up("a2", Up.UPDATE), b"forged update"),
                (t.up("a2", Up.STATUS), b"forged status"),
                (t.up("a2", Up.REGISTER), b"forged registration"),
                (t.down("a2", Down.TASK), b"forged task"),
                (t.global_model("S"), b"forged announcement"),
            ]
            for topic, payload in forged:
                a1.publish(topic, payload)
            a1.publish(t.up("a1", Up.UPDATE), b"own update")
            assert coord_in.wait_for(b"own update", timeout=10)

            # the coordinator sends a task to each agent, a2's first
            coord.publish(t.down("a2", Down.TASK), b"task for a2")
            coord.publish(t.down("a1", Down.TASK), b"task for a1")
            assert a1_in.wait_for(b"task for a1", timeout=10)
            assert a2_in.wait_for(b"task for a2", timeout=10)
            time.sleep(0.3)

            assert coord_in.payloads() == [b"own update", b"task for a2", b"task for a1"]
            assert a1_in.payloads() == [b"task for a1"]
            assert a2_in.payloads() == [b"task for a2"]


@pytest.mark.parametrize("kind", BROKER_KINDS)
def test_unknown_or_wrong_credentials_are_refused(kind: str, tmp_path: Path) -> None:
    with running_broker(kind, tmp_path, agents=["a1"]) as broker:
        good = broker.settings_for("a1")
        for settings, client_id in (
            (replace(good, password="wrong"), "a1"),
            (replace(good, username=None, password=None), "a1"),  # an anonymous local process
            (replace(good, username="a9"), "a9"),
        ):
            with pytest.raises(MqttConnectError, match=r"(?i)not authori"):
                MqttClient(settings, client_id).start(timeout=3)
        with connected(good, "a1", []) as a1:
            assert a1.is_connected
