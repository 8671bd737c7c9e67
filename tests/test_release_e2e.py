"""Deployment end to end: a trained federation's models reach the devices and serve there.

Real processes over a real Mosquitto: ``takfl-coordinator serve`` trains two rounds with
five ``takfl-agent run`` agents that also install releases and serve inference on
loopback. Then, from this test process, the release command (the library function behind
``takfl-coordinator release``, over the release service's own broker login):

1. releases round 0's models to every tier in two stages (half the devices, then all):
   every device installs release 1;
2. releases round 1's models the same way, with the M tier's release carrying reference
   outputs that do not match its model. That is the injected fault, made on the
   publisher's side in this process (everything else is the real code): M's canary fails
   its parity health check on the device, M's rollout halts and the canary gets a signed
   rollback to release 1, M's second device is never offered release 2, while S and L
   install release 2;
3. every agent answers predictions through its local endpoint: S and L from release 2,
   M from the model of release 1.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.broker.net import free_port
from coordinator.deploy import build
from coordinator.deploy.command import ReleaseSettings, release
from coordinator.deploy.records import DeviceState, RolloutState
from coordinator.deploy.rollout import Rollout
from coordinator.deploy.service import RELEASE_USER
from coordinator.testbed import Federation, federation, loopback_url, read_state
from takfl.federation_data import build_federation_data
from tests.brokers import MOSQUITTO_MISSING

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        MOSQUITTO_MISSING,
        reason="mosquitto is not installed (apt-get install mosquitto); .ci/install installs it",
    ),
]
AGENTS = ("S-000", "S-001", "M-000", "M-001", "L-000")


def get_json(url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def start_serving_agents(fed: Federation) -> dict[str, int]:
    """Every agent trains, installs releases (the fleet's root.json) and serves on a port."""
    ports = {}
    for aid in AGENTS:
        ports[aid] = free_port()
        fed.start_agent(
            aid,
            extra=[
                *("--release-root", str(fed.work / "root.json")),
                *("--state-dir", str(fed.work / "devices" / aid)),
                *("--serve", f"127.0.0.1:{ports[aid]}"),
            ],
        )
    return ports


def release_round(fed: Federation, round_: int) -> dict[str, Rollout]:
    settings = ReleaseSettings(
        broker=loopback_url(fed.service_port, RELEASE_USER),
        password=(fed.work / "release.password").read_text().strip(),
        agents_file=fed.work / "agents.json",
        round=round_,
        stages=(0.5, 1.0),
        abort_above=0.2,
        device_timeout_s=240.0,
        timeout_s=900.0,
    )
    return {r.prototype: r for r in release(fed.run_dir, None, settings)}


def test_release_to_every_tier_halts_a_failing_canary_and_every_agent_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with federation(tmp_path, "mosquitto", rounds=2) as fed:
        ports = start_serving_agents(fed)
        coord = fed.start_coordinator("--deadline", "180", "--wait-all", "300")
        assert coord.wait(900) == 0, fed.logs()
        assert read_state(fed.run_dir)["phase"] == "finished"

        first = release_round(fed, 0)

        assert {p: r.state for p, r in first.items()} == dict.fromkeys(
            "SML", RolloutState.COMPLETED
        ), fed.logs()
        for rollout in first.values():
            assert rollout.version == 1
            assert all(d.state == DeviceState.INSTALLED for d in rollout.devices.values())
            assert all(d.latency_p99_ms is not None for d in rollout.devices.values())

        # The injected fault: M's release 2 signs reference outputs its model does not give.
        real_pair = build.reference_pair

        def corrupted_for_m(cfg: Any, artifact: Path, runtime: str) -> tuple[Any, Any]:
            inputs, outputs = real_pair(cfg, artifact, runtime)
            if artifact.name.startswith("M-"):
                outputs = np.roll(outputs, 1, axis=1) * 3.0  # other classes, other scale
            return inputs, outputs

        monkeypatch.setattr(build, "reference_pair", corrupted_for_m)
        second = release_round(fed, 1)

        assert second["S"].state == second["L"].state == RolloutState.COMPLETED, fed.logs()
        assert all(
            d.state == DeviceState.INSTALLED and d.active_version == 2
            for p in "SL"
            for d in second[p].devices.values()
        )
        m = second["M"]
        assert m.state == RolloutState.ROLLED_BACK, (m, fed.logs())
        canary, later = m.devices["M-000"], m.devices["M-001"]
        assert canary.outcome == "failed" and canary.reason == "parity", canary
        assert canary.state == DeviceState.ROLLED_BACK and m.rollback_version == 3
        assert later.state == DeviceState.PENDING  # the second stage was never offered

        # Every agent serves predictions from the model it now holds.
        data = build_federation_data(fed.cfg, 0)
        x = data.test_x[:4].tolist()
        served = {
            aid: get_json(f"http://127.0.0.1:{port}/v1/predict", {"inputs": x, "normalised": True})
            for aid, port in ports.items()
        }
        models = {aid: get_json(f"http://127.0.0.1:{port}/v1/model") for aid, port in ports.items()}
        for aid in ("S-000", "S-001", "L-000"):
            assert served[aid]["version"] == 2 and models[aid]["round"] == 1, models[aid]
        assert served["M-000"]["version"] == 3 and models["M-000"]["round"] == 0  # rollback
        assert served["M-001"]["version"] == 1 and models["M-001"]["round"] == 0
        for aid, answer in served.items():
            assert len(answer["classes"]) == 4, (aid, answer)
            assert np.isfinite(np.asarray(answer["outputs"])).all(), aid
