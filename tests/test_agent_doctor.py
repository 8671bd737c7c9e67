"""``takfl-agent doctor`` against a real Mosquitto provisioned by the coordinator's own
``provision``, with the coordinator's real MQTT transport online; and its verdicts as pure
functions."""

from __future__ import annotations

import importlib.util
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from coordinator.registry import load_registry
from coordinator.testbed import ENV, Federation, federation
from coordinator.transport.mqtt import MqttTransport
from edge_agent.doctor import (
    Status,
    check_clock,
    check_platform,
    check_resources,
    check_runtime,
    check_torch,
    exit_code,
)
from takfl.config import load_profile
from takfl.federation_data import client_id
from takfl.mqtt.url import parse_broker_url
from takfl.secret_files import write_secret_file
from takfl.wire.signing import generate_secret
from tests.brokers import MOSQUITTO_MISSING

WIDE = {**ENV, "COLUMNS": "250", "NO_COLOR": "1", "TTY_COMPATIBLE": "0"}
PI5 = load_profile("raspberry-pi-5")
M0 = client_id("M", 0)


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "doctor", *args],
        capture_output=True,
        text=True,
        env=WIDE,
        timeout=600,
    )


def row(output: str, check: str) -> str:
    """The table row (first line) of ``check`` in the doctor's output."""
    for line in output.splitlines():
        if re.match(rf"\s*{re.escape(check)}\s", line):
            return line
    raise AssertionError(f"no {check!r} row in:\n{output}")


@contextmanager
def fleet_with_coordinator(tmp_path: Path) -> Iterator[Federation]:
    """Provisioned digits fleet on Mosquitto, with the coordinator's transport online."""
    with federation(tmp_path, "mosquitto") as fed:
        # the coordinator's transport announces itself online; no agent needs registering
        password = (fed.work / "coordinator.password").read_text().strip()
        transport = MqttTransport(
            replace(parse_broker_url(fed.broker_url_coordinator), password=password),
            fed.cfg.name,
            load_registry(fed.work / "agents.json"),
            num_classes=10,
            input_shape=(1, 8, 8),
        )
        transport.start(timeout=10)
        try:
            yield fed
        finally:
            transport.close()


def broker_args(fed: Federation, agent: str, secret: Path | None = None) -> list[str]:
    return [
        "--broker",
        fed.broker_url_agents,
        "--id",
        agent,
        "--secret-file",
        str(secret or fed.work / "secrets" / f"{agent}.secret"),
    ]


pytestmark_mosquitto = pytest.mark.skipif(MOSQUITTO_MISSING, reason="mosquitto not installed")


@pytest.mark.slow
@pytestmark_mosquitto
@pytest.mark.mosquitto
def test_doctor_passes_a_provisioned_agent_and_catches_wrong_password_and_fleet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="coordinator.transport.presence")
    with fleet_with_coordinator(tmp_path) as fed:
        fleet = fed.cfg.name
        wrong = tmp_path / "wrong.secret"
        write_secret_file(wrong, generate_secret())

        good = doctor("--profile", "raspberry-pi-5", *broker_args(fed, M0), "--fleet", fleet)
        bad_password = doctor(
            "--profile", "raspberry-pi-5", *broker_args(fed, M0, wrong), "--fleet", fleet
        )
        bad_fleet = doctor(
            "--profile", "raspberry-pi-5", *broker_args(fed, M0), "--fleet", "other-fleet"
        )

    assert good.returncode == 0, good.stdout + good.stderr
    assert "ok" in row(good.stdout, "credentials")
    assert "allowed on takfl/" in row(good.stdout, "publish")
    assert f"fleet {fleet} online" in row(good.stdout, "coordinator")
    assert "ok" in row(good.stdout, "torch")
    # the doctor's test publish is the agent's own status, signed as the agent signs it: the
    # coordinator, which knows the agent, takes it for a status and not for a forgery
    assert not [r for r in caplog.records if "ignored status" in r.getMessage()], caplog.text

    assert bad_password.returncode == 1
    line = row(bad_password.stdout, "credentials")
    assert "FAIL" in line and "Not authorized" in line
    assert "takfl-coordinator provision" in bad_password.stdout

    assert bad_fleet.returncode == 1
    publish = row(bad_fleet.stdout, "publish")
    assert "FAIL" in publish and "takfl/other-fleet/" in publish and "Not authorized" in publish
    coordinator = row(bad_fleet.stdout, "coordinator")
    assert "FAIL" in coordinator and "no coordinator of fleet other-fleet" in coordinator


@pytest.mark.slow
@pytestmark_mosquitto
@pytest.mark.mosquitto
def test_doctor_says_when_no_coordinator_is_online(tmp_path: Path) -> None:
    with federation(tmp_path, "mosquitto") as fed:
        done = doctor(
            "--profile",
            "raspberry-pi-5",
            *broker_args(fed, M0),
            "--fleet",
            fed.cfg.name,
            "--wait",
            "1",
        )

    assert done.returncode == 1
    assert "allowed on" in row(done.stdout, "publish")
    assert "takfl-coordinator serve" in done.stdout


def test_doctor_catches_a_missing_runtime(tmp_path: Path) -> None:
    if importlib.util.find_spec("tflite_runtime") is not None:
        pytest.skip("tflite-runtime is installed here, so it cannot be the missing runtime")
    profile = load_profile("raspberry-pi-4").model_dump(mode="json")
    profile["name"] = "pi-with-tflite-runtime"
    profile["inference"]["runtime"] = "tflite-runtime"
    path = tmp_path / "pi.yaml"
    path.write_text(yaml.safe_dump(profile))

    done = doctor("--profile", str(path))

    assert done.returncode == 1
    line = row(done.stdout, "runtime tflite-runtime")
    assert "FAIL" in line and "not installed" in line


def test_doctor_rejects_bad_input_with_exit_2(tmp_path: Path) -> None:
    assert doctor("--profile", "no-such-board").returncode == 2
    done = doctor("--profile", "raspberry-pi-4", "--broker", "http://x", "--id", "a")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


# --- verdicts, pure ------------------------------------------------------------------------


def test_platform_and_python_verdicts() -> None:
    assert [c.status for c in check_platform("aarch64", "Linux", (3, 11, 2))] == [Status.OK] * 2
    arm32, old = check_platform("armv7l", "Linux", (3, 9, 2))
    assert arm32.status is Status.FAIL and "64-bit" in arm32.fix
    assert old.status is Status.FAIL


def test_torch_verdicts() -> None:
    cpu = {"version": "2.10.0", "cuda": None, "cuda_available": False, "threads": 4, "import_s": 3}
    cuda_on_pi = {**cpu, "cuda": "13.0"}
    jetson = load_profile("jetson-orin-nano")

    assert check_torch(cpu, PI5).status is Status.OK
    assert check_torch(cuda_on_pi, PI5).status is Status.WARN
    assert "CUDA build" in check_torch(cuda_on_pi, PI5).fix
    assert check_torch(cpu, jetson).status is Status.WARN
    assert "jetson.md" in check_torch(cpu, jetson).fix
    assert check_torch({"error": "ImportError: libcudnn"}, PI5).status is Status.FAIL


def test_resource_verdicts() -> None:
    pi4 = load_profile("raspberry-pi-4")  # memory limit 1024 MB, 4 threads

    fine = check_resources(pi4, total_mb=4000, available_mb=3000, free_disk_mb=9000, cores=4)
    small = check_resources(pi4, total_mb=900, available_mb=500, free_disk_mb=100, cores=2)

    assert [c.status for c in fine] == [Status.OK] * 3
    assert [c.status for c in small] == [Status.FAIL, Status.FAIL, Status.WARN]
    assert exit_code(small) == 1 and exit_code(fine) == 0


def test_clock_and_runtime_verdicts() -> None:
    assert check_clock(1000.0, 1100.0, True).status is Status.FAIL
    assert "100 s behind" in check_clock(1000.0, 1100.0, True).detail
    assert check_clock(1000.0, 999.0, True).status is Status.OK
    assert check_clock(1000.0, None, False).status is Status.WARN
    assert check_runtime("onnxruntime", True, "").status is Status.OK
    assert check_runtime("tflite-runtime", False, "not installed").status is Status.FAIL
