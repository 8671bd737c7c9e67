"""MQTT brokers for tests: the embedded amqtt broker, or a real Mosquitto with a
generated configuration (password file, ACL, persistence), each on a free
loopback port and always stopped afterwards.

    from tests.brokers import BROKER_KINDS, running_broker

    @pytest.mark.parametrize("kind", BROKER_KINDS)
    def test_x(kind, tmp_path):
        with running_broker(kind, tmp_path, agents=["a1"]) as broker:
            settings = broker.settings_for("a1")     # MqttSettings with credentials
            coord = broker.coordinator_settings
            broker.restart()                          # same port, same state directory

The Mosquitto variant is skipped (with a reason) only when the binary is missing.
"""

from __future__ import annotations

import getpass
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from coordinator.broker import EmbeddedBroker, MosquittoProcess, find_mosquitto, free_port
from coordinator.broker.acl import BrokerAccess
from coordinator.broker.mosquitto import MosquittoFiles, write_mosquitto_config
from coordinator.broker.net import LOOPBACK
from coordinator.transport.mqtt import MqttTransport, TransportPolicy
from edge_agent.codec_state import CodecState
from edge_agent.link import AgentIdentity, AgentLink, LinkPolicy
from takfl.config.profile import CommsSpec
from takfl.mqtt.client import MqttSettings
from takfl.mqtt.retry import RetryPolicy
from takfl.wire.messages import MAX_PACKET_BYTES
from takfl.wire.signing import generate_secret
from takfl.wire.validation import AgentRecord

EMBEDDED = "embedded"
MOSQUITTO = "mosquitto"
MOSQUITTO_MISSING = find_mosquitto() is None
SKIP_NO_MOSQUITTO = pytest.mark.skipif(MOSQUITTO_MISSING, reason="mosquitto binary not installed")
COORDINATOR_USER = "takfl-coordinator"  # also the coordinator's client id
DEFAULT_FLEET = "test"

# Parametrise a test over both brokers: @pytest.mark.parametrize("kind", BROKER_KINDS)
BROKER_KINDS = [
    pytest.param(EMBEDDED, id=EMBEDDED),
    pytest.param(MOSQUITTO, id=MOSQUITTO, marks=[pytest.mark.mosquitto, SKIP_NO_MOSQUITTO]),
]

# Fast reconnects for tests.
BASE_SETTINGS = MqttSettings(host=LOOPBACK, keepalive_s=10, reconnect_min_s=1, reconnect_max_s=2)


@dataclass
class BrokerHandle:
    """A running broker and the client settings to reach it."""

    kind: str
    host: str
    port: int
    fleet: str
    coordinator_settings: MqttSettings
    agent_settings: dict[str, MqttSettings]
    files: MosquittoFiles | None = None  # Mosquitto only
    _server: Any = field(default=None, repr=False)
    monitor_settings: MqttSettings | None = None  # Mosquitto's service listener, if asked

    def settings_for(self, agent: str) -> MqttSettings:
        """Client settings (with the agent's credentials on Mosquitto)."""
        return self.agent_settings[agent]

    def stop(self) -> None:
        self._server.stop()

    def start(self) -> None:
        """Start again on the same port (Mosquitto: same persistence directory)."""
        if self.kind == EMBEDDED:
            access = self._server.access
            self._server = EmbeddedBroker(
                self.port,
                host=self.host,
                access=access,
                max_packet_bytes=self._server.max_packet_bytes,
            ).start()
        else:
            self._server.start()

    def restart(self) -> None:
        self.stop()
        self.start()


MONITOR_USER = "takfl-monitor"
MONITOR_PASSWORD = "monitor-" + secrets.token_hex(8)


def _mosquitto(
    tmp_path: Path,
    fleet: str,
    agents: list[str],
    persistence: bool,
    use_tool: bool | None,
    max_packet_bytes: int,
    service: bool,
) -> tuple[MosquittoProcess, dict[str, str], str]:
    passwords = {a: secrets.token_hex(8) for a in agents}
    coordinator_password = secrets.token_hex(8)
    files = write_mosquitto_config(
        tmp_path / "mosquitto",
        fleet=fleet,
        port=free_port(),
        host=LOOPBACK,
        coordinator=(COORDINATOR_USER, coordinator_password),
        agents=passwords,
        persistence=persistence,
        autosave_interval_s=1,
        run_as=getpass.getuser(),
        use_tool=use_tool,
        max_packet_bytes=max_packet_bytes,
        monitor=(MONITOR_USER, MONITOR_PASSWORD) if service else None,
        service_port=free_port() if service else None,
    )
    return MosquittoProcess(files), passwords, coordinator_password


@contextmanager
def running_broker(
    kind: str,
    tmp_path: Path,
    *,
    fleet: str = DEFAULT_FLEET,
    agents: Iterable[str] = ("a1", "a2"),
    persistence: bool = True,
    use_tool: bool | None = None,
    max_packet_bytes: int = MAX_PACKET_BYTES,
    service: bool = False,
) -> Iterator[BrokerHandle]:
    """Start a broker of ``kind`` ("embedded" or "mosquitto") on a free loopback port.

    Both get a user per agent (username = agent id) plus the coordinator user and the
    fleet's ACL; Mosquitto's generated configuration in ``tmp_path/mosquitto`` also has
    persistence, and with ``service`` a service listener with a monitor login
    (``monitor_settings``). The broker is stopped on exit, also when the body raises.
    """
    agent_ids = list(agents)
    handle: BrokerHandle
    if kind == EMBEDDED:
        passwords = {a: secrets.token_hex(8) for a in agent_ids}
        coord_pw = secrets.token_hex(8)
        access = BrokerAccess.for_fleet(fleet, (COORDINATOR_USER, coord_pw), passwords)
        server = EmbeddedBroker(
            host=LOOPBACK, access=access, max_packet_bytes=max_packet_bytes
        ).start()
        base = replace(BASE_SETTINGS, port=server.port)
        handle = BrokerHandle(
            kind,
            server.host,
            server.port,
            fleet,
            replace(base, username=COORDINATOR_USER, password=coord_pw),
            {a: replace(base, username=a, password=passwords[a]) for a in agent_ids},
            None,
            server,
        )
    elif kind == MOSQUITTO:
        if MOSQUITTO_MISSING:
            pytest.skip("mosquitto binary not installed")
        proc, passwords, coord_pw = _mosquitto(
            tmp_path, fleet, agent_ids, persistence, use_tool, max_packet_bytes, service
        )
        proc.start()
        base = replace(BASE_SETTINGS, port=proc.port)
        handle = BrokerHandle(
            kind,
            proc.host,
            proc.port,
            fleet,
            replace(base, username=COORDINATOR_USER, password=coord_pw),
            {a: replace(base, username=a, password=passwords[a]) for a in agent_ids},
            proc.files,
            proc,
            None
            if proc.files.service_port is None
            else replace(
                base,
                port=proc.files.service_port,
                username=MONITOR_USER,
                password=MONITOR_PASSWORD,
            ),
        )
    else:
        raise ValueError(f"unknown broker kind {kind!r}; expected {EMBEDDED!r} or {MOSQUITTO!r}")
    try:
        yield handle
    finally:
        handle._server.stop()


# -- coordinator and agents over a test broker ----------------------------------------------------
def make_registry(prototypes: dict[str, str]) -> dict[str, AgentRecord]:
    """A registry with a fresh secret per agent: agent id -> prototype given."""
    return {
        a: AgentRecord(agent_id=a, prototype=p, secret=generate_secret())
        for a, p in prototypes.items()
    }


FAST_TRANSPORT = TransportPolicy(quiet_s=0.5, task_retry=RetryPolicy(base_s=2.0, max_s=2.0))
# Tasks asking for fp32 updates (bit-exact; any other compression is refused codec_mismatch).
FP32_TRANSPORT = replace(FAST_TRANSPORT, comms=CommsSpec(compression="fp32"))
FAST_LINK = LinkPolicy(quiet_s=0.5, update_retry=RetryPolicy(base_s=2.0, max_s=2.0))


@contextmanager
def coordinator_transport(
    broker: BrokerHandle,
    registry: dict[str, AgentRecord],
    *,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (1, 8, 8),
    policy: TransportPolicy = FAST_TRANSPORT,
) -> Iterator[MqttTransport]:
    """A started :class:`MqttTransport` on ``broker``; closed on exit."""
    transport = MqttTransport(
        broker.coordinator_settings,
        broker.fleet,
        registry,
        num_classes=num_classes,
        input_shape=input_shape,
        policy=policy,
        client_id=COORDINATOR_USER,
    )
    transport.start(timeout=10)
    try:
        yield transport
    finally:
        transport.close()


@contextmanager
def agent_link(
    broker: BrokerHandle,
    record: AgentRecord,
    *,
    num_samples: int = 10,
    policy: LinkPolicy = FAST_LINK,
    codec_state: CodecState | None = None,
) -> Iterator[AgentLink]:
    """A started :class:`AgentLink` for a provisioned agent (``codec_state``: where it
    keeps its residual and received models; default: in memory); closed on exit."""
    identity = AgentIdentity(
        agent_id=record.agent_id,
        prototype=record.prototype,
        secret=record.secret,
        num_samples=num_samples,
    )
    link = AgentLink(
        broker.settings_for(record.agent_id),
        broker.fleet,
        identity,
        policy=policy,
        codec_state=codec_state,
    )
    link.start(timeout=10)
    try:
        yield link
    finally:
        link.close()
