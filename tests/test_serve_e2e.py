"""``takfl-agent serve`` end to end: a real agent process and a real Mosquitto broker (the
generated configuration: passwords, ACL). The test plays the coordinator's release
service with the library pieces it is built from: a release signed with a key from
``generate_release_key``, an offer signed with the agent's secret, the artifacts
answered from a ``BlobSender`` as the agent asks for their chunks. The agent reports
downloading -> verifying -> installed and then answers predictions on its endpoint,
upgrades to the next release, refuses a replay of an older one and reports its
inference telemetry with its status."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from coordinator.broker.net import free_port
from coordinator.testbed import ENV
from takfl.mqtt.blobs import BlobSender, BlobStore
from takfl.mqtt.client import MqttClient
from takfl.release.keys import KEY_FILE, ROOT_FILE, generate_release_key, load_signer
from takfl.secret_files import write_secret_file
from takfl.wire.messages import ChunkRequest, Status, decode_message, encode_message
from takfl.wire.release import ReleaseReport
from takfl.wire.signing import generate_secret, verify
from takfl.wire.topics import Down, Topics, Up
from tests.brokers import COORDINATOR_USER, MOSQUITTO, SKIP_NO_MOSQUITTO, running_broker
from tests.release_fixtures import (
    AGENT,
    FLEET,
    PROTOTYPE,
    Built,
    build,
    normalise,
    offer,
    onnx_model,
    run_onnx,
    samples,
)

pytestmark = [pytest.mark.mosquitto, SKIP_NO_MOSQUITTO]

REPO = Path(__file__).resolve().parent.parent
CHUNK = 1024  # artifacts travel in several chunks
WAIT_S = 90.0  # a loaded two-core machine starts a Python process slowly


def wait_for(check: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


class Coordinator:
    """The coordinator's side of releases, from library pieces: reads reports and
    statuses, answers chunk requests from its blob store, publishes offers."""

    def __init__(self, settings: Any, secret: bytes) -> None:
        self.topics = Topics(FLEET)
        self.secret = secret
        self.client = MqttClient(settings, COORDINATOR_USER)
        self.sender = BlobSender(self.client, BlobStore())
        self.reports: queue.Queue[ReleaseReport] = queue.Queue()
        self.statuses: list[Status] = []
        self.client.route(self.topics.up_filter(Up.RELEASE), self._on_report)
        self.client.route(self.topics.up_filter(Up.REQUEST), self._on_request)
        self.client.route(self.topics.up_filter(Up.STATUS), self._on_status)

    def _on_report(self, _topic: str, payload: bytes) -> None:
        report = decode_message(ReleaseReport, payload)
        if verify(report, self.secret):
            self.reports.put(report)

    def _on_request(self, _topic: str, payload: bytes) -> None:
        request = decode_message(ChunkRequest, payload)
        if verify(request, self.secret):
            self.sender.answer(self.topics.down(AGENT, Down.CHUNK), request, AGENT)

    def _on_status(self, _topic: str, payload: bytes) -> None:
        status = decode_message(Status, payload)
        if verify(status, self.secret):
            self.statuses.append(status)

    def release(self, built: Built) -> None:
        for data in built.blobs.values():
            self.sender.keep(data, CHUNK)
        message = offer(built, self.secret, chunk_size=CHUNK, sent_at=time.time())
        self.client.publish(self.topics.down(AGENT, Down.RELEASE), encode_message(message))

    def next_reports(self, final: str = "installed|failed") -> list[ReleaseReport]:
        """Reports up to the next one in a final state."""
        out: list[ReleaseReport] = []
        while not out or out[-1].state not in final.split("|"):
            out.append(self.reports.get(timeout=WAIT_S))
        return out


def http(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_installs_a_release_from_mosquitto_and_answers_predictions(
    tmp_path: Path,
) -> None:
    # Prepare: the fleet's release key, the agent's secret and profile, two releases
    generate_release_key(tmp_path / "keys")
    signer = load_signer(tmp_path / "keys" / KEY_FILE)
    secret = generate_secret()
    write_secret_file(tmp_path / "a1.secret", secret)
    models = {v: onnx_model(v) for v in (1, 2, 3)}
    releases = {v: build(signer, v, models[v]) for v in (1, 2)}
    profile = tmp_path / "device.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "name": "test-board",
                "prototype": PROTOTYPE,
                "hardware_class": "raspberry-pi",
                "model": {"builder": "mlp_digits"},
                "inference": {
                    "runtime": "onnxruntime",
                    "format": "onnx",
                    "latency_budget_ms": 500,
                },
            }
        )
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "agent.log").open("wb")
    with running_broker(MOSQUITTO, tmp_path, fleet=FLEET, agents=[AGENT]) as broker:
        password = tmp_path / "a1.password"
        password.write_text(str(broker.settings_for(AGENT).password))
        password.chmod(0o600)
        coordinator = Coordinator(broker.coordinator_settings, secret)
        coordinator.client.start(timeout=10)
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edge_agent.cli",
                "serve",
                "--profile",
                str(profile),
                "--broker",
                f"mqtt://{AGENT}@{broker.host}:{broker.port}",
                "--password-file",
                str(password),
                "--id",
                AGENT,
                "--secret-file",
                str(tmp_path / "a1.secret"),
                "--release-root",
                str(tmp_path / "keys" / ROOT_FILE),
                "--state-dir",
                str(tmp_path / "state"),
                "--listen",
                f"127.0.0.1:{port}",
                "--fleet",
                FLEET,
                "--status-every",
                "1",
            ],
            cwd=REPO,
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: any(s.state == "online" for s in coordinator.statuses), "online")
            before = http(f"{url}/v1/health")
            # Execute: release 1
            coordinator.release(releases[1])
            first = coordinator.next_reports()
            x = samples(3, seed=7)
            answer = http(f"{url}/v1/predict", {"inputs": x.tolist()})
            # ...release 2, then a replay of an older version (newly signed 1)
            coordinator.release(releases[2])
            second = coordinator.next_reports()
            upgraded = http(f"{url}/v1/predict", {"inputs": x.tolist()})
            coordinator.release(build(signer, 1, models[3], model_name="S-replay-fp32.onnx"))
            replay = coordinator.next_reports()
            still = http(f"{url}/v1/predict", {"inputs": x.tolist()})
            telemetry = wait_for(
                lambda: next(
                    (
                        s.inference
                        for s in reversed(coordinator.statuses)
                        if s.inference is not None and s.inference.requests >= 3
                    ),
                    None,
                ),
                "inference telemetry on the status",
            )
        finally:
            agent.terminate()
            stopped = agent.wait(timeout=60)
            coordinator.client.stop()
            log.close()
    output = (tmp_path / "agent.log").read_text(errors="replace")
    # Assert: nothing served before; release 1 installed step by step, then served
    assert before == (503, {"status": "no model", "version": None}), output
    assert [r.state for r in first] == ["downloading", "verifying", "installed"], output
    assert first[-1].active_version == 1 and first[-1].latency_p99_ms is not None
    assert first[-1].install_s is not None and first[-1].runtime == "onnxruntime"
    assert answer[0] == 200 and answer[1]["version"] == 1
    want = {v: run_onnx(models[v], normalise(x)) for v in (1, 2)}
    np.testing.assert_allclose(answer[1]["outputs"], want[1], rtol=1e-5, atol=1e-5)
    # ...release 2 replaced it; the replayed older version was refused, 2 kept serving
    assert [r.state for r in second] == ["downloading", "verifying", "installed"]
    assert upgraded[0] == 200 and upgraded[1]["version"] == 2
    np.testing.assert_allclose(upgraded[1]["outputs"], want[2], rtol=1e-5, atol=1e-5)
    assert [(r.state, r.reason) for r in replay] == [("failed", "old_version")]
    assert replay[-1].active_version == 2
    assert still[0] == 200 and still[1]["version"] == 2
    # ...the status carried the inference telemetry; the agent stopped cleanly, offline
    assert telemetry.active_version == 2 and telemetry.errors == 0
    assert telemetry.latency_p50_ms is not None and telemetry.latency_p50_ms > 0
    assert stopped == 0, output
    assert coordinator.statuses[-1].state == "offline"
