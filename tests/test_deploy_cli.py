"""``takfl-coordinator release``, ``rollback`` and ``status`` on a run directory:
clear errors on bad options, a rollback delivered over the embedded broker to simulated
devices (which download the old artifacts and verify the newer metadata naming them),
the release tables of ``status`` and the report's release section."""

from __future__ import annotations

import json
import shutil
import stat
import time
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.broker import free_port
from coordinator.broker.net import LOOPBACK
from coordinator.cli import app
from coordinator.deploy.publish import load_signing
from coordinator.deploy.records import RolloutState
from coordinator.deploy.rollout import Rollout, new_rollout
from coordinator.deploy.store import ReleaseStore
from coordinator.deploy.summary import latency_rows, rollout_rows
from coordinator.registry import provision_agents
from coordinator.report.write import render_html
from coordinator.serve import provision
from profiles import __file__ as profiles_init
from takfl.config import load_federation
from takfl.mqtt.client import MqttSettings
from takfl.mqtt.credentials import mqtt_password
from takfl.release.keys import generate_release_key
from takfl.wire.release import ReleaseReport
from tests.deploy_fixtures import SimDevice, Trusted, synthetic_release

DIGITS_YAML = Path(profiles_init).parent / "federations" / "digits.yaml"
runner = CliRunner()


def make_run(root: Path) -> Path:
    """A run directory as serve leaves it, for release purposes: config, state, agents,
    the release key; no models (rollbacks need only stored releases)."""
    run = root / "run"
    run.mkdir()
    shutil.copy(DIGITS_YAML, run / "config.yaml")
    (run / "state.json").write_text(json.dumps({"round": 1, "config": "digits"}))
    provision_agents(load_federation(DIGITS_YAML), run)
    generate_release_key(run)
    return run


def invoke(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give --prototype P"),
        (("--prototype", "M", "--all"), "give --prototype P"),
        (("--all", "--stages", "50%,10%,100%"), "stages must increase"),
        (("--all", "--abort-above", "150%"), "between 0% and 100%"),
        (("--all", "--broker", "mqtt://h:1", "--password-file", "/nope"), "cannot read"),
    ],
)
def test_release_refuses_bad_options_before_doing_anything(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    run = make_run(tmp_path)

    code, output = invoke("release", run, *args)

    assert code == 2 and message in output
    assert not (run / "releases" / "rollouts.json").exists()


def test_release_without_a_provisioned_run_is_a_clean_error(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    (run / "agents.json").unlink()

    code, output = invoke("release", run, "--all")

    assert code == 2 and "no agent registry" in output


def test_release_of_a_run_without_state_is_a_clean_error(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    (run / "state.json").unlink()

    code, output = invoke("release", run, "--prototype", "L")

    assert code == 2 and "state.json; is it a run directory?" in output


def test_rollback_of_an_unknown_version_is_a_clean_error(tmp_path: Path) -> None:
    run = make_run(tmp_path)

    code, output = invoke("rollback", run, "--prototype", "L", "--to", "4")

    assert code == 2 and "no release 4 of L" in output


@pytest.mark.slow  # a real broker and seconds of waiting: the full suite runs it
def test_rollback_over_the_embedded_broker_reinstates_the_old_release(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    signing = load_signing(run, "digits")
    store = ReleaseStore(run)
    v1 = synthetic_release(store, signing, "L", seed=1, size=2_500_000, chunk_size=1 << 20)
    v2 = synthetic_release(store, signing, "L", seed=2)
    records = json.loads((run / "agents.json").read_text())["agents"]
    port = free_port()
    base = MqttSettings(host=LOOPBACK, port=port, reconnect_min_s=1, reconnect_max_s=1)
    devices = []
    for rec in records:
        if rec["prototype"] != "L":
            continue
        secret = bytes.fromhex(rec["secret_hex"])
        device = SimDevice(
            settings=replace(base, username=rec["agent_id"], password=mqtt_password(secret)),
            fleet="digits",
            agent_id=rec["agent_id"],
            prototype="L",
            secret=secret,
            root=signing.root,
            trusted=Trusted(2, v2.release.digest),
            held=dict(v2.blobs),
            active=2,
        )
        device.client.start(timeout=None)  # connects once the command's broker is up
        devices.append(device)
    try:
        code, output = invoke(
            "rollback", run, "--prototype", "L", "--to", "1", "--port", port,
            "--device-timeout", "30", "--timeout", "60",
        )  # fmt: skip
    finally:
        for d in devices:
            d.stop()

    assert code == 0, output
    assert "release 3 of L: a rollback to release 1" in output
    assert "rollback to 1" in output and "completed" in output
    for d in devices:
        assert d.active == 1 and d.trusted.version == 3
        assert set(v1.blobs) <= set(d.held)  # the old artifacts, downloaded and checked
    [rollout] = store.load_rollouts()
    assert rollout.state == RolloutState.COMPLETED and rollout.action == "rollback"
    assert {d.state.value for d in rollout.devices.values()} == {"installed"}

    code, output = invoke("status", "--run-dir", run)

    assert code == 0 and "releases (newest first)" in output and "rollback to 1" in output
    assert "on-device inference latency" in output and "workstation" in output


def _rollouts() -> list[Rollout]:
    halted = new_rollout(
        prototype="S", version=2, agents=["S-000", "S-001"], now=1.0, stages=(0.5, 1.0),
        previous=1, artifact_bytes=4096,
    )  # fmt: skip
    halted.start(1.0)
    failed = ReleaseReport(
        agent_id="S-000", prototype="S", rollout="S-v2", version=2, state="failed",
        reason="parity", sent_at=2.0,
    )  # fmt: skip
    halted.report("S-000", failed, 2.0)
    halted.begin_rollback(3, 3.0)
    done = new_rollout(prototype="M", version=1, agents=["M-000", "M-001"], now=5.0, stages=(1.0,))
    done.start(5.0)
    for agent, p50 in (("M-000", 2.0), ("M-001", 4.0)):
        report = ReleaseReport(
            agent_id=agent, prototype="M", rollout="M-v1", version=1, state="installed",
            runtime="ai-edge-litert", latency_p50_ms=p50, latency_p99_ms=2 * p50,
            install_s=1.5, sent_at=6.0,
        )  # fmt: skip
        done.report(agent, report, 6.0)
    return [halted, done]


def test_release_summaries_count_states_per_tier_and_latency_per_hardware_class() -> None:
    rollouts = _rollouts()

    rows = rollout_rows(rollouts)
    latency = latency_rows(rollouts, {"M": "raspberry-pi", "S": "phone"})

    assert [r["rollout"] for r in rows] == ["M-v1", "S-v2"]  # newest first
    m, s = rows
    assert (m["state"], m["installed"], m["offered"], m["failed"]) == ("completed", 2, 2, {})
    assert s["state"] == "halted" and s["failed"] == {"parity": 1} and s["offered"] == 1
    assert s["stage"] == "1/2" and "1 of 1 device(s) failed" in s["halt_reason"]
    [row] = latency
    assert row["hardware_class"] == "raspberry-pi" and row["devices"] == 2
    assert row["p50_ms"] == 3.0 and row["p99_ms"] == 6.0 and row["worst_p99_ms"] == 8.0


def test_the_report_has_a_release_section() -> None:
    rollouts = _rollouts()
    releases = {
        "rollouts": rollout_rows(rollouts),
        "latency": latency_rows(rollouts, {"M": "raspberry-pi"}),
    }
    rep = {
        "config": "digits", "run": "r", "algorithm": "fedavg", "rounds": 1, "phase": None,
        "generated": time.strftime("%Y"), "prototypes": ["M"], "accuracy": {},
        "final": {"fedavg": {"M": 90.0}}, "lambdas": {}, "devices": {}, "agents": [],
        "stragglers": [], "traffic": [], "exports": [], "releases": releases,
    }  # fmt: skip

    html = render_html(rep)
    without = render_html(rep | {"releases": {"rollouts": [], "latency": []}})

    assert "Releases to the devices" in html and "rollback" not in without
    assert "raspberry-pi" in html and "parity 1" in html
    assert "nothing released from this run" in without


def test_provision_makes_the_release_key_once_and_the_release_login(tmp_path: Path) -> None:
    cfg = load_federation(DIGITS_YAML)

    provision(cfg, tmp_path, mosquitto_port=free_port())
    key = (tmp_path / "release-key.pem").read_bytes()
    provision(cfg, tmp_path, mosquitto_port=free_port())  # again: the devices' key stays

    acl = (tmp_path / "mosquitto" / "acl").read_text()
    release_acl = acl.split("user takfl-release\n")[1].split("\n\n")[0].splitlines()
    assert release_acl == [
        "topic write takfl/digits/agent/+/down/release",
        "topic write takfl/digits/agent/+/down/chunk",
        "topic read takfl/digits/agent/+/up/release",
        "topic read takfl/digits/agent/+/up/request",
    ]
    assert (tmp_path / "release-key.pem").read_bytes() == key
    assert stat.S_IMODE((tmp_path / "release.password").stat().st_mode) == 0o600
    assert "takfl-release:" in (tmp_path / "mosquitto" / "passwords").read_text()
    assert load_signing(tmp_path, "digits").fleet == "digits"
