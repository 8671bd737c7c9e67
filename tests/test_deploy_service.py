"""The release service over a real Mosquitto (generated configuration with the release
login and its ACL), with simulated devices: staged promotion, a silent device timed out,
a failed canary halting its tier and rolled back without downloading anything, devices
of later stages never offered, and the records on disk."""

from __future__ import annotations

import getpass
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.broker import MosquittoProcess, free_port
from coordinator.broker.mosquitto import write_mosquitto_config
from coordinator.broker.net import LOOPBACK
from coordinator.deploy.control import ReleaseControl
from coordinator.deploy.publish import Published, StoredReleases
from coordinator.deploy.records import RolloutState
from coordinator.deploy.rollout import Rollout, new_rollout
from coordinator.deploy.service import RELEASE_USER, ReleaseService
from coordinator.deploy.store import ReleaseStore
from takfl.mqtt.client import MqttClient, MqttSettings
from takfl.wire.messages import ChunkRequest, encode_message
from takfl.wire.signing import generate_secret, sign
from takfl.wire.topics import Down, Topics, Up
from takfl.wire.validation import AgentRecord
from tests.brokers import SKIP_NO_MOSQUITTO
from tests.deploy_fixtures import FLEET, SimDevice, Trusted, signing_for, synthetic_release

pytestmark = [pytest.mark.mosquitto, SKIP_NO_MOSQUITTO]

M_AGENTS = [f"M-{k:03d}" for k in range(4)]
S_AGENTS = [f"S-{k:03d}" for k in range(3)]
COORDINATOR_USER = "takfl-coordinator"


@dataclass
class Broker:
    port: int
    passwords: dict[str, str]

    def settings(self, user: str) -> MqttSettings:
        return MqttSettings(
            host=LOOPBACK,
            port=self.port,
            username=user,
            password=self.passwords[user],
            keepalive_s=10,
            reconnect_min_s=1,
            reconnect_max_s=2,
        )


@contextmanager
def mosquitto(tmp_path: Path, agents: list[str]) -> Iterator[Broker]:
    """Mosquitto with the coordinator, the release service and ``agents`` as provisioned."""
    passwords = {u: secrets.token_hex(8) for u in [*agents, COORDINATOR_USER, RELEASE_USER]}
    files = write_mosquitto_config(
        tmp_path / "mosquitto",
        fleet=FLEET,
        port=free_port(),
        coordinator=(COORDINATOR_USER, passwords[COORDINATOR_USER]),
        agents={a: passwords[a] for a in agents},
        release=(RELEASE_USER, passwords[RELEASE_USER]),
        persistence=False,
        run_as=getpass.getuser(),
        use_tool=False,
    )
    proc = MosquittoProcess(files).start()
    try:
        yield Broker(files.port, passwords)
    finally:
        proc.stop()


def completed(prototype: str, version: int, agents: list[str]) -> Rollout:
    """The record of an earlier rollout that completed (the fleet runs ``version``)."""
    r = new_rollout(prototype=prototype, version=version, agents=agents, now=1.0)
    r.state, r.finished_at = RolloutState.COMPLETED, 2.0
    return r


@pytest.mark.slow  # a real broker and seconds of waiting: the full suite runs it
def test_staged_rollout_with_a_timeout_and_a_halted_tier_rolled_back(tmp_path: Path) -> None:
    signing = signing_for(tmp_path / "keys")
    store = ReleaseStore(tmp_path / "run")
    v1 = {p: synthetic_release(store, signing, p, seed=1) for p in ("M", "S")}
    v2 = {p: synthetic_release(store, signing, p, seed=2, size=5000) for p in ("M", "S")}
    registry = {
        a: AgentRecord(agent_id=a, prototype=a[0], secret=generate_secret())
        for a in [*M_AGENTS, *S_AGENTS]
    }
    history = [completed("M", 1, M_AGENTS), completed("S", 1, S_AGENTS)]
    rollouts = [
        new_rollout(
            prototype="M",
            version=2,
            agents=M_AGENTS,
            now=time.time(),
            stages=(0.5, 1.0),
            abort_above=0.5,
            device_timeout_s=8.0,
            previous=1,
        ),
        new_rollout(
            prototype="S",
            version=2,
            agents=S_AGENTS,
            now=time.time(),
            stages=(0.3, 1.0),
            abort_above=0.2,
            device_timeout_s=8.0,
            previous=1,
        ),
    ]
    records = [*history, *rollouts]
    behaviour = {"M-003": "silent", "S-000": "fails"}
    lines: list[str] = []

    with mosquitto(tmp_path, list(registry)) as broker:
        devices = {
            a: SimDevice(
                settings=broker.settings(a),
                fleet=FLEET,
                agent_id=a,
                prototype=r.prototype,
                secret=r.secret,
                root=signing.root,
                behaviour=behaviour.get(a, "healthy"),
                trusted=Trusted(1, v1[r.prototype].release.digest),
                held=dict(v1[r.prototype].blobs),
                active=1,
            ).start()
            for a, r in registry.items()
        }
        source = StoredReleases(store, signing, {"M": 1024, "S": 2048}, v2.values())
        control = ReleaseControl(
            registry,
            rollouts,
            source,
            save=lambda: store.save_rollouts(records),
            offer_retry_s=1.0,
        )
        service = ReleaseService(
            broker.settings(RELEASE_USER),
            FLEET,
            registry,
            control,
            report=lines.append,
        )
        # a device never offered S's release asks for its model anyway
        threading.Timer(1.0, ask_unoffered, (devices["S-002"], v2["S"])).start()
        finished = service.run(timeout_s=60)
        for d in devices.values():
            d.stop()

    m, s = {r.prototype: r for r in store.load_rollouts()[2:]}.values()
    assert finished
    # M: two stages; the silent device timed out (1 of 4: within 50%), re-offered meanwhile
    assert m.state == RolloutState.COMPLETED
    assert {a: d.state.value for a, d in m.devices.items()} == {
        "M-000": "installed",
        "M-001": "installed",
        "M-002": "installed",
        "M-003": "timed_out",
    }
    assert len(devices["M-003"].offers) >= 2
    assert m.devices["M-000"].latency_p50_ms == 1.25 and m.devices["M-000"].install_s == 0.5
    for a in ("M-000", "M-001", "M-002"):
        assert devices[a].active == 2 and set(v2["M"].blobs) <= set(devices[a].held)
    # S: the canary failed its health check: halted, rolled back, the rest never offered
    assert s.state == RolloutState.ROLLED_BACK and s.rollback_version == 3
    assert s.devices["S-000"].state.value == "rolled_back"
    assert s.devices["S-000"].outcome == "failed" and s.devices["S-000"].reason == "parity"
    canary = devices["S-000"]
    assert [(o.action, o.version) for o in canary.offers] == [("install", 2), ("rollback", 3)]
    assert canary.active == 1 and canary.trusted.version == 3
    assert canary.chunk_requests == 2  # v2's model and reference; the rollback reused v1's
    assert devices["S-001"].offers == [] and devices["S-002"].offers == []
    assert devices["S-002"].chunks_received == 0
    assert {s.devices[a].state.value for a in ("S-001", "S-002")} == {"pending"}
    assert store.latest_version("S") == 3 and store.latest_version("M") == 2
    assert all(d.forged == 0 for d in devices.values())
    assert any("S-v2: halted" in line for line in lines)
    assert any("M-v2: completed, 3/4 installed" in line for line in lines)


def ask_unoffered(device: SimDevice, release: Published) -> None:
    digest = release.release.model.sha256
    request = ChunkRequest(agent_id=device.agent_id, digest=digest, missing=[0, 1, 2])
    device.client.publish(
        device.topics.up(device.agent_id, Up.REQUEST), encode_message(sign(request, device.secret))
    )


class Inbox:
    def __init__(self) -> None:
        self.topics: list[str] = []
        self.event = threading.Event()

    def __call__(self, topic: str, _payload: bytes) -> None:
        self.topics.append(topic)
        self.event.set()


def test_the_release_login_may_send_offers_and_chunks_but_nothing_else(tmp_path: Path) -> None:
    topics = Topics(FLEET)
    with mosquitto(tmp_path, ["M-000"]) as broker:
        inbox, spy = Inbox(), Inbox()
        agent = MqttClient(broker.settings("M-000"), "M-000", persistent=False)
        agent.route(topics.down_filter("M-000", Down.RELEASE), inbox)
        agent.route(topics.down_filter("M-000", Down.TASK), inbox)
        agent.start(timeout=10)
        release = MqttClient(broker.settings(RELEASE_USER), RELEASE_USER, persistent=False)
        release.route(topics.up_filter(Up.UPDATE), spy)  # not granted: never delivered
        release.start(timeout=10)
        try:
            release.publish(topics.down("M-000", Down.TASK), b"not allowed")
            agent.publish(topics.up("M-000", Up.UPDATE), b"not for the release user")
            release.publish(topics.down("M-000", Down.RELEASE), b"allowed")
            assert inbox.event.wait(5)
            time.sleep(1.0)
        finally:
            agent.stop()
            release.stop()

    assert inbox.topics == [topics.down("M-000", Down.RELEASE)]
    assert spy.topics == []
