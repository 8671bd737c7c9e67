"""The doctor's broker checks that need no broker: reaching the address, and reading the
coordinator's last status."""

from __future__ import annotations

from coordinator.broker.net import free_port
from edge_agent.doctor import Status
from edge_agent.doctor_command import coordinator_check, reachable
from takfl.mqtt.client import MqttSettings


def test_an_online_coordinator_passes() -> None:
    # Execute
    check = coordinator_check("online", "digits", 5.0)

    # Assert
    assert check.status is Status.OK and "digits" in check.detail


def test_an_offline_or_silent_coordinator_fails_with_its_fix() -> None:
    # Execute
    offline = coordinator_check("offline", "lab", 2.0)
    silent = coordinator_check(None, "lab", 2.0)

    # Assert
    assert offline.status is silent.status is Status.FAIL
    assert "(offline within 2 s)" in offline.detail
    assert "(not seen within 2 s)" in silent.detail
    assert "--fleet" in silent.fix and "takfl-coordinator serve" in silent.fix


def test_a_closed_port_is_unreachable() -> None:
    # Prepare: a free port nobody listens on
    settings = MqttSettings(host="127.0.0.1", port=free_port())

    # Execute
    check = reachable(settings)

    # Assert
    assert check.status is Status.FAIL
    assert "cannot reach 127.0.0.1:" in check.detail and "--broker" in check.fix
