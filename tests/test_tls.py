"""TLS end to end: ``provision --tls`` makes a CA, a server certificate and a TLS listener;
agents that trust the CA connect; an agent given the wrong CA logs why it cannot."""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.broker.mosquitto import MosquittoProcess
from coordinator.broker.net import free_port
from coordinator.broker.tls import make_fleet_tls, san_entry
from coordinator.cli import app
from coordinator.serve import provision
from takfl.config import load_federation
from takfl.mqtt.client import MqttClient, MqttConnectError, MqttSettings, TlsSettings
from takfl.mqtt.credentials import mqtt_password
from takfl.secret_files import load_secret_file
from tests.brokers import SKIP_NO_MOSQUITTO

pytestmark = [
    pytest.mark.mosquitto,
    SKIP_NO_MOSQUITTO,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed"),
]


def test_san_entries() -> None:
    assert san_entry("127.0.0.1") == "IP:127.0.0.1"
    assert san_entry("::1") == "IP:::1"
    assert san_entry("broker.lan") == "DNS:broker.lan"
    with pytest.raises(ValueError):
        san_entry("bad host")


def test_provision_tls_cli_writes_ca_certificate_and_listener(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    result = CliRunner().invoke(
        app,
        [
            "provision",
            "--config",
            "digits",
            "--out",
            str(out),
            "--mosquitto-port",
            "1883",
            "--tls",
            "--tls-host",
            "127.0.0.1",
            "--tls-host",
            "broker.lan",
            "--tls-port",
            "8884",
        ],
    )
    assert result.exit_code == 0, result.output
    for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
        assert (out / "tls" / name).is_file()
    assert os.stat(out / "tls" / "ca.key").st_mode & 0o077 == 0
    conf = (out / "mosquitto" / "mosquitto.conf").read_text()
    # the TLS listener binds the --tls-host that is an address, not every interface
    assert "listener 8884 127.0.0.1\n" in conf and "listener 8884\n" not in conf
    assert f"certfile {(out / 'tls' / 'server.crt').resolve()}" in conf
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", str(out / "tls" / "server.crt")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:broker.lan" in text


def test_provision_tls_without_host_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["provision", "--config", "digits", "--out", str(tmp_path), "--tls"]
    )
    assert result.exit_code == 2
    assert "--tls-host" in result.output


@pytest.mark.slow
def test_agent_trusting_the_fleet_ca_connects_and_a_wrong_ca_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_federation("digits")
    work = tmp_path / "fleet"
    tls_port = free_port()
    records, files, _ = provision(
        cfg,
        work,
        mosquitto_port=free_port(),
        mosquitto_user=getpass.getuser(),
        tls_hosts=["127.0.0.1"],
        tls_port=tls_port,
    )
    assert files is not None
    agent = records[0]
    secret_file = work / "secrets" / f"{agent.agent_id}.secret"
    password = mqtt_password(load_secret_file(secret_file))
    wrong = make_fleet_tls(tmp_path / "other-ca", ["127.0.0.1"])  # a CA that did not sign it
    with MosquittoProcess(files):
        settings = MqttSettings(
            port=tls_port,
            username=agent.agent_id,
            password=password,
            tls=TlsSettings(ca_file=str(work / "tls" / "ca.crt")),
            reconnect_min_s=1,
            reconnect_max_s=2,
        )
        good = MqttClient(settings, agent.agent_id)
        good.start(timeout=10)
        assert good.is_connected
        good.stop()

        caplog.set_level(logging.WARNING, logger="takfl.mqtt.client")
        bad = MqttClient(replace(settings, tls=TlsSettings(ca_file=str(wrong.ca_cert))), "x")
        with pytest.raises(MqttConnectError, match="certificate"):
            bad.start(timeout=3)
        assert "certificate verify failed" in caplog.text

        # the real agent process with the wrong CA says so in its log
        log_path = tmp_path / "agent.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edge_agent.cli",
                    "run",
                    "--profile",
                    "android-phone",
                    "--broker",
                    f"mqtts://127.0.0.1:{tls_port}",
                    "--ca-file",
                    str(wrong.ca_cert),
                    "--id",
                    agent.agent_id,
                    "--secret-file",
                    str(secret_file),
                    "--demo-shard",
                    "0",
                    "--threads",
                    "1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            end = time.monotonic() + 120
            while time.monotonic() < end and "certificate verify failed" not in log_text(log_path):
                time.sleep(0.5)
        finally:
            proc.kill()
            proc.wait(30)
        output = log_text(log_path)
        assert "TLS handshake" in output and "certificate verify failed" in output, output


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
