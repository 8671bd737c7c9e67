"""Listeners bind loopback unless told otherwise: the Prometheus endpoint (and off loopback
only with TLS, or the explicit --metrics-plaintext), and the Mosquitto listeners that
provision generates (TLS on the addresses given, site brokers on loopback)."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.broker.site import SiteSpec
from coordinator.broker.tls import make_fleet_tls, tls_listen_addresses
from coordinator.cli import app
from coordinator.metrics import MetricsTls, PrometheusMetrics, endpoint_problem
from coordinator.serve import provision, provision_sites
from takfl.config import load_federation

WIDE = {"COLUMNS": "200"}


def listeners(conf: Path) -> list[str]:
    return [line for line in conf.read_text().splitlines() if line.startswith("listener ")]


def tls_listeners(conf: Path) -> list[str]:
    """The agents' TLS listeners (port 8883); the plain and service ones stay on loopback."""
    found = listeners(conf)
    assert all(x.endswith(" 127.0.0.1") for x in found if not x.startswith("listener 8883 "))
    return [x for x in found if x.startswith("listener 8883 ")]


def test_metrics_bind_loopback_by_default() -> None:
    metrics = PrometheusMetrics(["S"])
    try:
        port = metrics.serve(0)
        assert metrics._server.server_address[0] == "127.0.0.1"
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b"takfl_round" in body
    finally:
        metrics.close()


def test_metrics_off_loopback_need_tls_or_an_explicit_plaintext() -> None:
    tls = MetricsTls("c.pem", "k.pem")
    assert endpoint_problem("127.0.0.1", None, False) is None
    assert endpoint_problem("::1", None, False) is None
    problem = endpoint_problem("0.0.0.0", None, False)
    assert problem is not None and "--metrics-cert-file" in problem
    assert endpoint_problem("0.0.0.0", tls, False) is None
    assert endpoint_problem("192.168.1.10", None, True) is None


def test_serve_refuses_open_metrics_before_starting_anything(tmp_path: Path) -> None:
    args = ["serve", "--config", "digits", "--run-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(
        app, [*args, "--metrics-port", "0", "--metrics-bind", "0.0.0.0"], env=WIDE
    )
    assert result.exit_code == 2
    assert "without authentication" in result.output
    assert not (tmp_path / "run").exists()


def test_metrics_over_tls_with_client_certificates(tmp_path: Path) -> None:
    # Prepare
    material = make_fleet_tls(tmp_path / "tls", ["127.0.0.1"])
    trust = ssl.create_default_context(cafile=str(material.ca_cert))
    metrics = PrometheusMetrics(["S"])
    mutual = PrometheusMetrics(["S"])
    try:
        port = metrics.serve(
            0, "127.0.0.1", MetricsTls(str(material.server_cert), str(material.server_key))
        )
        mport = mutual.serve(
            0,
            "127.0.0.1",
            MetricsTls(str(material.server_cert), str(material.server_key), str(material.ca_cert)),
        )
        # Execute / Assert: HTTPS with the fleet CA works, plain HTTP does not
        body = urllib.request.urlopen(
            f"https://127.0.0.1:{port}/metrics", timeout=5, context=trust
        ).read()
        assert b"takfl_round" in body
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        # a scraper without a client certificate is turned away
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(
                f"https://127.0.0.1:{mport}/metrics", timeout=5, context=trust
            ).read()
    finally:
        metrics.close()
        mutual.close()


def test_tls_listener_binds_the_addresses_given_never_all(tmp_path: Path) -> None:
    cfg = load_federation("digits")
    # a host name only: loopback, not every interface
    _, files, _ = provision(cfg, tmp_path / "a", mosquitto_port=18830, tls_hosts=["broker.lan"])
    assert files is not None
    # the plain listener, TLS, the service listener (monitors, the release service)
    assert listeners(files.conf) == [
        "listener 18830 127.0.0.1",
        "listener 8883 127.0.0.1",
        "listener 18831 127.0.0.1",
    ]
    # an address agents connect to is listened on
    _, files, _ = provision(
        cfg, tmp_path / "b", mosquitto_port=18830, tls_hosts=["broker.lan", "192.168.1.10"]
    )
    assert files is not None
    assert tls_listeners(files.conf) == ["listener 8883 192.168.1.10"]
    # --listen decides
    _, files, _ = provision(
        cfg,
        tmp_path / "c",
        mosquitto_port=18830,
        tls_hosts=["broker.lan"],
        listen=["10.0.0.5", "10.0.0.6"],
    )
    assert files is not None
    assert tls_listeners(files.conf) == ["listener 8883 10.0.0.5", "listener 8883 10.0.0.6"]
    assert tls_listen_addresses(["h"], ["0.0.0.0"], "127.0.0.1") == ("0.0.0.0",)


def test_provision_listen_on_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    base = ["provision", "--config", "digits", "--out", str(out), "--mosquitto-port", "18830"]
    result = CliRunner().invoke(
        app, [*base, "--tls", "--tls-host", "broker.lan", "--listen", "10.1.2.3"], env=WIDE
    )
    assert result.exit_code == 0, result.output
    assert "bound to 10.1.2.3" in result.output
    assert tls_listeners(out / "mosquitto" / "mosquitto.conf") == ["listener 8883 10.1.2.3"]
    refused = CliRunner().invoke(app, [*base, "--listen", "10.1.2.3"], env=WIDE)
    assert refused.exit_code == 2 and "--tls" in refused.output


def test_site_brokers_listen_on_loopback_by_default(tmp_path: Path) -> None:
    cfg = load_federation("digits")
    _, central, _ = provision(cfg, tmp_path, mosquitto_port=18830)
    assert central is not None
    (site,) = provision_sites(
        cfg, tmp_path, central, [SiteSpec.parse("lab")], central_host="127.0.0.1", port=18831
    )
    assert listeners(site.broker.conf) == ["listener 18831 127.0.0.1"]
