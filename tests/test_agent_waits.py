"""``takfl-agent run`` never waits silently: a refused connection, a refused message and a
missing coordinator are reported with the fix. Real agent processes against a real Mosquitto
(provisioned by the coordinator's ``provision``) and the embedded broker; ``LinkWatch``'s
timing as a pure unit."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from coordinator.broker.net import free_port
from coordinator.testbed import ENV, federation
from edge_agent.watch import LinkWatch
from takfl.federation_data import client_id
from takfl.secret_files import write_secret_file
from takfl.wire.signing import generate_secret
from tests.brokers import EMBEDDED, MOSQUITTO_MISSING, running_broker

M0 = client_id("M", 0)


class AgentProcess:
    """``takfl-agent run`` as a child process whose output lines are collected."""

    def __init__(self, *args: str) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "run", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**ENV, "COLUMNS": "400"},
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip())

    def wait_for(self, *fragments: str, timeout: float = 120) -> str:
        """The first output line holding every fragment; fails after ``timeout`` s."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.seen:
                if all(f in line for f in fragments):
                    return line
            try:
                self.seen.append(self.lines.get(timeout=0.5))
            except queue.Empty:
                continue
        tail = "\n".join(self.seen[-30:])
        raise AssertionError(f"no line with {fragments} within {timeout} s:\n{tail}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def agent_args(broker: str, secret: Path, *extra: str) -> list[str]:
    return [
        "--profile",
        "raspberry-pi-5",
        "--broker",
        broker,
        "--id",
        M0,
        "--secret-file",
        str(secret),
        "--demo-shard",
        "0",
        "--threads",
        "1",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.mosquitto
@pytest.mark.skipif(MOSQUITTO_MISSING, reason="mosquitto not installed")
def test_run_reports_a_refused_connection_and_a_refused_message(tmp_path: Path) -> None:
    with federation(tmp_path, "mosquitto") as fed:
        wrong = tmp_path / "wrong.secret"
        write_secret_file(wrong, generate_secret())
        good_secret = fed.work / "secrets" / f"{M0}.secret"
        refused = AgentProcess(*agent_args(fed.broker_url_agents, wrong))
        wrong_fleet = AgentProcess(
            *agent_args(fed.broker_url_agents, good_secret, "--fleet", "other", "--patience", "3")
        )
        try:
            line = refused.wait_for("refused agent", "Not authorized", "Fix:")
            assert "takfl-coordinator provision" in line
            denied = wrong_fleet.wait_for("refused a message", "takfl/other/", "Fix:")
            assert "Not authorized" in denied and "--fleet other" in denied
            waiting = wrong_fleet.wait_for("no coordinator of fleet other")
            assert "takfl-coordinator serve" in waiting
        finally:
            refused.stop()
            wrong_fleet.stop()


@pytest.mark.slow
def test_run_falls_back_to_mqtt_311_and_reports_a_missing_coordinator(tmp_path: Path) -> None:
    secret = tmp_path / "a.secret"
    write_secret_file(secret, generate_secret())
    with running_broker(EMBEDDED, tmp_path, fleet="lonely", agents=[M0]) as broker:
        password = tmp_path / "broker.password"
        password.write_text(f"{broker.settings_for(M0).password}\n")
        password.chmod(0o600)
        url = f"mqtt://{M0}@{broker.host}:{broker.port}"
        agent = AgentProcess(
            *agent_args(url, secret, "--fleet", "lonely", "--patience", "2"),
            "--password-file",
            str(password),
        )
        try:
            agent.wait_for("speaks MQTT 3.1.1 only")
            agent.wait_for("no coordinator of fleet lonely", "Fix:")
        finally:
            agent.stop()


@pytest.mark.slow
def test_run_reports_an_unreachable_broker(tmp_path: Path) -> None:
    secret = tmp_path / "a.secret"
    write_secret_file(secret, generate_secret())
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    agent = AgentProcess(*agent_args(url, secret, "--patience", "2"))
    try:
        line = agent.wait_for("no connection to the broker")
        assert "Fix:" in line
    finally:
        agent.stop()


# --- LinkWatch, pure ---------------------------------------------------------------------


def make_watch() -> LinkWatch:
    return LinkWatch(agent_id="M-000", fleet="f", broker="h:1", started=100.0, patience_s=10)


def test_watch_reports_a_wait_after_patience_then_doubling() -> None:
    watch = make_watch()

    def at(t: float, connected: bool = True) -> str | None:
        return watch.tick(t, connected=connected, registered=False, last_error=None)

    assert at(100) is None
    assert at(105) is None
    first = at(111)
    assert first is not None and "no coordinator of fleet f" in first and "11 s" in first
    assert at(115) is None
    assert at(121) is None  # next after another 11 s (the time waited so far)
    assert at(123) is not None


def test_watch_is_quiet_once_registered_and_names_the_broker_when_disconnected() -> None:
    watch = make_watch()

    assert watch.tick(200, connected=True, registered=True, last_error=None) is None
    line = watch.tick(300, connected=False, registered=False, last_error="connection failed")
    assert line is None  # the broker wait starts now
    line = watch.tick(311, connected=False, registered=False, last_error="connection failed")
    assert line is not None and "no connection to the broker at h:1 for 11 s" in line


def test_watch_reports_each_refusal_once() -> None:
    watch = make_watch()

    first = watch.refused("Not authorized")
    assert first is not None and "provision" in first
    assert watch.refused("Not authorized") is None
    assert watch.refused("Server unavailable") is not None
    assert watch.denied("takfl/f/agent/M-000/up/status", "Not authorized") is not None
    assert watch.denied("takfl/f/agent/M-000/up/status", "Not authorized") is None
