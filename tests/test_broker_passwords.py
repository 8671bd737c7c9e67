"""Broker passwords come from a file or the environment, never from the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.cli import app
from takfl.mqtt.url import PASSWORD_ENV, parse_broker_url, read_password


def test_serve_refuses_a_password_in_the_broker_url(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "serve",
            "--config",
            "digits",
            "--broker",
            "mqtt://takfl-coordinator:s3cret@127.0.0.1:1",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        terminal_width=200,
    )
    assert result.exit_code == 2
    assert "process list" in result.output and "--password-file" in result.output
    assert not (tmp_path / "run").exists()


def test_password_from_file_then_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "coordinator.password"
    path.write_text("from-file\n")
    path.chmod(0o600)
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    assert read_password(path) == "from-file"
    assert read_password(None) == "from-env"
    monkeypatch.delenv(PASSWORD_ENV)
    assert read_password(None) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_password(tmp_path / "empty")
    settings = parse_broker_url("mqtt://takfl-coordinator@host:1884", password="from-file")
    assert (settings.username, settings.password, settings.port) == (
        "takfl-coordinator",
        "from-file",
        1884,
    )


def test_tls_options_need_mqtts() -> None:
    with pytest.raises(ValueError, match="mqtts"):
        parse_broker_url("mqtt://host:1", ca_file="ca.crt")
    with pytest.raises(ValueError, match="both"):
        parse_broker_url("mqtts://host", cert_file="c.crt")
    assert parse_broker_url("mqtts://host", ca_file="ca.crt").port == 8883
