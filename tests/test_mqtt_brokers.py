"""Broker helpers: the embedded amqtt broker and the generated Mosquitto configuration."""

from __future__ import annotations

import base64
import getpass
import shutil
import socket
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.broker import BrokerStartError, EmbeddedBroker, MosquittoProcess, free_port
from coordinator.broker.acl import BrokerAccess
from coordinator.broker.mosquitto import (
    MosquittoTls,
    acl_text,
    find_mosquitto,
    hash_password,
    write_mosquitto_config,
)
from coordinator.broker.net import LOOPBACK, port_accepts
from takfl.mqtt.client import MqttClient, MqttConnectError, MqttSettings, TlsSettings
from takfl.wire.errors import TopicError
from takfl.wire.topics import Topics
from tests.brokers import SKIP_NO_MOSQUITTO

# A line written by `mosquitto_passwd -b pw alice s3cret` (Mosquitto 2.0.11).
MOSQUITTO_PASSWD_LINE = (
    "alice:$7$101$sKHC4Nrqk+p7ECFf$NPPLJCWdIirsYV3DCGZS9m0aRarJU1ofhORRdhf3mcajRYy9LiG1ofPq6xsok"
    "zKQFM6mglTMyHMtcT61SXj38Q=="
)


ACCESS = BrokerAccess.for_fleet("test", ("takfl-coordinator", "coord-pw"), {"a1": "a1-pw"})


def test_embedded_broker_serves_stops_and_restarts_on_its_port() -> None:
    with EmbeddedBroker(access=ACCESS) as broker:
        port = broker.port
        client = MqttClient(MqttSettings(port=port, username="a1", password="a1-pw"), "a1")
        client.start(timeout=10)
        assert client.is_connected
        client.stop()
    assert not port_accepts(LOOPBACK, port)
    again = EmbeddedBroker(port, access=ACCESS).start()
    try:
        assert port_accepts(LOOPBACK, port)
    finally:
        again.stop()
        again.stop()  # idempotent
    assert not again.running


def test_embedded_broker_refuses_non_loopback_addresses() -> None:
    with pytest.raises(ValueError, match="loopback"):
        EmbeddedBroker(host="0.0.0.0", access=ACCESS)


def test_embedded_broker_reports_a_taken_port() -> None:
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(BrokerStartError, match=str(port)):
            EmbeddedBroker(port, access=ACCESS).start(timeout=5)


def test_python_hash_matches_mosquitto_passwd_output() -> None:
    _user, hashed = MOSQUITTO_PASSWD_LINE.split(":", 1)
    _, _, iterations, salt, _ = hashed.split("$")
    assert (
        hash_password("s3cret", salt=base64.b64decode(salt), iterations=int(iterations)) == hashed
    )


def test_generated_configuration(tmp_path: Path) -> None:
    tls = MosquittoTls(
        port=8883, cert_file="/etc/c.pem", key_file="/etc/k.pem", ca_file="/etc/ca.pem"
    )
    files = write_mosquitto_config(
        tmp_path,
        fleet="lab",
        port=18830,
        coordinator=("coord", "pw"),
        agents={"pi-1": "x1", "pi-2": "x2"},
        tls=tls,
        use_tool=False,
    )
    conf = files.conf.read_text().splitlines()
    for line in (
        "allow_anonymous false",
        f"password_file {files.passwords.resolve()}",
        f"acl_file {files.acl.resolve()}",
        "persistence true",
        f"persistence_location {files.data.resolve()}/",
        "listener 18830 127.0.0.1",
        "use_username_as_clientid true",
        "listener 8883 127.0.0.1",
        "certfile /etc/c.pem",
        "keyfile /etc/k.pem",
        "cafile /etc/ca.pem",
    ):
        assert line in conf, line
    users = [line.split(":")[0] for line in files.passwords.read_text().splitlines()]
    assert users == ["coord", "pi-1", "pi-2"]
    assert all(
        line.split(":")[1].startswith("$7$101$")
        for line in files.passwords.read_text().splitlines()
    )
    assert stat.S_IMODE(files.passwords.stat().st_mode) == 0o600
    acl = files.acl.read_text()
    assert "user coord\ntopic readwrite takfl/lab/#" in acl
    assert (
        "user pi-1\ntopic write takfl/lab/agent/pi-1/up/#\n"
        "topic read takfl/lab/agent/pi-1/down/#\ntopic read takfl/lab/broadcast/#"
    ) in acl
    assert files.password_method == "python"


def test_configuration_refuses_bad_names(tmp_path: Path) -> None:
    with pytest.raises(TopicError):
        acl_text(Topics("lab"), "coord", ["a/b"])
    with pytest.raises(ValueError, match="also an agent"):
        write_mosquitto_config(
            tmp_path,
            fleet="lab",
            port=1,
            coordinator=("a1", "p"),
            agents={"a1": "q"},
            use_tool=False,
        )
    with pytest.raises(ValueError, match="line break"):
        write_mosquitto_config(
            tmp_path, fleet="lab", port=1, coordinator=("c", "p\n"), agents={}, use_tool=False
        )


PASSWORD_METHODS = [
    pytest.param(False, id="python"),
    pytest.param(
        True,
        id="mosquitto_passwd",
        marks=pytest.mark.skipif(
            find_mosquitto("mosquitto_passwd") is None, reason="mosquitto_passwd not installed"
        ),
    ),
]


@SKIP_NO_MOSQUITTO
@pytest.mark.mosquitto
@pytest.mark.parametrize("use_tool", PASSWORD_METHODS)
def test_password_file_is_accepted_by_mosquitto(tmp_path: Path, use_tool: bool) -> None:
    files = write_mosquitto_config(
        tmp_path,
        fleet="lab",
        port=free_port(),
        coordinator=("coord", "cpw"),
        agents={"a1": "good"},
        run_as=getpass.getuser(),
        use_tool=use_tool,
    )
    with MosquittoProcess(files) as broker:
        ok = MqttClient(MqttSettings(port=broker.port, username="a1", password="good"), "a1")
        ok.start(timeout=10)
        ok.stop()
        bad = MqttClient(MqttSettings(port=broker.port, username="a1", password="bad"), "a1")
        with pytest.raises(MqttConnectError, match=r"(?i)not authori"):
            bad.start(timeout=5)


@SKIP_NO_MOSQUITTO
@pytest.mark.mosquitto
def test_mosquitto_reports_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        port = holder.getsockname()[1]
        files = write_mosquitto_config(
            tmp_path,
            fleet="lab",
            port=port,
            coordinator=("c", "p"),
            agents={},
            run_as=getpass.getuser(),
            use_tool=False,
        )
        proc = MosquittoProcess(files)
        try:
            with pytest.raises(BrokerStartError, match="already in use"):
                proc.start(timeout=3)
        finally:
            proc.stop()


def _self_signed_server(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate for 127.0.0.1, server key), made with openssl."""
    openssl = shutil.which("openssl")
    assert openssl is not None
    ca_key, ca, key, csr, cert = (
        tmp_path / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    ext = tmp_path / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for cmd in (
        [
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            ca_key,
            "-out",
            ca,
            "-days",
            "1",
            "-subj",
            "/CN=takfl-test-ca",
        ],
        [
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            csr,
            "-subj",
            "/CN=127.0.0.1",
        ],
        [
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            cert,
            "-days",
            "1",
            "-extfile",
            ext,
        ],
    ):
        subprocess.run([openssl, *map(str, cmd)], check=True, capture_output=True, timeout=60)
    return ca, cert, key


@pytest.mark.slow
@SKIP_NO_MOSQUITTO
@pytest.mark.mosquitto
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_listener_accepts_clients_that_trust_its_ca(tmp_path: Path) -> None:
    ca, cert, key = _self_signed_server(tmp_path)
    tls_port = free_port()
    files = write_mosquitto_config(
        tmp_path / "conf",
        fleet="lab",
        port=free_port(),
        coordinator=("coord", "cpw"),
        agents={"a1": "good"},
        tls=MosquittoTls(port=tls_port, cert_file=str(cert), key_file=str(key)),
        run_as=getpass.getuser(),
        use_tool=False,
    )
    with MosquittoProcess(files):
        settings = MqttSettings(
            port=tls_port, username="a1", password="good", tls=TlsSettings(ca_file=str(ca))
        )
        client = MqttClient(settings, "a1")
        client.start(timeout=10)
        assert client.is_connected
        client.stop()
        (tmp_path / "other").mkdir()
        other_ca, _, _ = _self_signed_server(tmp_path / "other")  # a CA that did not sign it
        untrusting = MqttClient(replace(settings, tls=TlsSettings(ca_file=str(other_ca))), "a1")
        with pytest.raises(MqttConnectError):
            untrusting.start(timeout=1.5)
