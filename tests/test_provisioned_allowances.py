"""Sample allowances come from provisioning: a per-fleet or per-agent allowance, else a
fleet-wide ceiling under which the first registration pins one; above it a first
registration is refused, not pinned; a re-provisioning (a new secret) raises it for a
replacement device."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.broker.mosquitto import hash_password
from coordinator.cli import app
from coordinator.registry import (
    DEFAULT_SAMPLE_CEILING,
    REGISTRY_FILE,
    RegistryError,
    load_registry,
    reprovision_agent,
    save_registry,
    secret_path,
)
from coordinator.serve import provision, wire_registry
from coordinator.transport.inbound import read
from coordinator.transport.presence import Presence
from takfl.config import load_federation
from takfl.mqtt.credentials import mqtt_password
from takfl.secret_files import load_secret_file
from takfl.wire.messages import Registration, encode_message
from takfl.wire.signing import sign
from takfl.wire.topics import Topics, Up
from takfl.wire.validation import Refusal, Verdict

TOPICS = Topics("digits")


def register(presence: Presence, agent: str, secret: bytes, num_samples: int) -> Verdict:
    """A signed registration of ``agent`` claiming ``num_samples``, through the presence."""
    reg = Registration(
        agent_id=agent,
        prototype=agent.rpartition("-")[0],
        profile="workstation",
        hardware_class="workstation",
        num_samples=num_samples,
        sent_at=0.0,
    )
    payload = encode_message(sign(reg, secret))
    received = read(
        Registration,
        TOPICS,
        TOPICS.up(agent, Up.REGISTER),
        payload,
        presence.registry,
        authenticate=False,
    )
    verdict, _ack = presence.register(received)
    return verdict


def provisioned(tmp_path: Path, **kw: int | None) -> Path:
    provision(load_federation("digits"), tmp_path, **kw)  # type: ignore[arg-type]
    return tmp_path


def test_a_first_registration_over_the_default_ceiling_is_refused_not_pinned(
    tmp_path: Path,
) -> None:
    # Prepare: provisioned without an allowance (the first registration sets it)
    out = provisioned(tmp_path)
    pinned: list[tuple[str, int]] = []
    presence = Presence(
        wire_registry(load_registry(out / REGISTRY_FILE)),
        on_allowance=lambda a, n: pinned.append((a, n)),
    )
    secret = load_secret_file(secret_path(out, "L-001"))
    # Execute
    verdict = register(presence, "L-001", secret, 2**53)
    # Assert
    assert verdict.reason is Refusal.SAMPLE_CAP and "ceiling" in verdict.detail
    assert pinned == [] and presence.registry["L-001"].max_samples is None
    assert presence.clients() == {}
    # an honest count under the ceiling is pinned as before
    assert register(presence, "L-001", secret, 404).accepted
    assert pinned == [("L-001", 404)]
    assert load_registry(out / REGISTRY_FILE)["L-001"].sample_ceiling == DEFAULT_SAMPLE_CEILING


def test_fleet_ceiling_and_allowance_from_provisioning(tmp_path: Path) -> None:
    out = provisioned(tmp_path / "a", sample_ceiling=500)
    presence = Presence(wire_registry(load_registry(out / REGISTRY_FILE)))
    secret = load_secret_file(secret_path(out, "M-000"))
    assert register(presence, "M-000", secret, 501).reason is Refusal.SAMPLE_CAP
    assert register(presence, "M-000", secret, 500).accepted

    out = provisioned(tmp_path / "b", max_samples=100)
    presence = Presence(wire_registry(load_registry(out / REGISTRY_FILE)))
    secret = load_secret_file(secret_path(out, "M-000"))
    verdict = register(presence, "M-000", secret, 101)
    assert verdict.reason is Refusal.SAMPLE_CAP and "allowed 100" in verdict.detail


def test_reprovisioning_raises_the_allowance_for_a_replacement_device(tmp_path: Path) -> None:
    # Prepare: every agent allowed 100 samples; the replacement L-001 has 404
    out = provisioned(tmp_path, max_samples=100)
    old_secret = load_secret_file(secret_path(out, "L-001"))
    others = {a: r for a, r in load_registry(out / REGISTRY_FILE).items() if a != "L-001"}
    before = Presence(wire_registry(load_registry(out / REGISTRY_FILE)))
    assert register(before, "L-001", old_secret, 404).reason is Refusal.SAMPLE_CAP
    # Execute
    record = reprovision_agent(out, "L-001", max_samples=500)
    # Assert
    registry = load_registry(out / REGISTRY_FILE)
    new_secret = load_secret_file(secret_path(out, "L-001"))
    assert record.max_samples == 500 and new_secret != old_secret
    assert {a: r for a, r in registry.items() if a != "L-001"} == others
    presence = Presence(wire_registry(registry))
    assert register(presence, "L-001", old_secret, 404).reason is Refusal.BAD_SIGNATURE
    assert register(presence, "L-001", new_secret, 404).accepted
    assert register(presence, "L-001", new_secret, 501).reason is Refusal.SAMPLE_CAP
    with pytest.raises(RegistryError, match="not in"):
        reprovision_agent(out, "Z-009", max_samples=5)


def test_provision_agent_on_the_command_line_updates_the_broker_password(tmp_path: Path) -> None:
    # Prepare: a fleet with a Mosquitto configuration
    out = tmp_path / "fleet"
    args = ["provision", "--config", "digits", "--out", str(out), "--mosquitto-port", "18830"]
    assert CliRunner().invoke(app, args).exit_code == 0
    passwords = out / "mosquitto" / "passwords"
    old_lines = dict(line.split(":", 1) for line in passwords.read_text().splitlines())
    # Execute
    result = CliRunner().invoke(
        app, [*args[:5], "--agent", "L-001", "--max-samples", "500"], env={"COLUMNS": "200"}
    )
    # Assert
    assert result.exit_code == 0, result.output
    assert "L-001" in result.output and "500" in result.output
    new_lines = dict(line.split(":", 1) for line in passwords.read_text().splitlines())
    assert set(new_lines) == set(old_lines)
    changed = {u for u in new_lines if new_lines[u] != old_lines[u]}
    assert changed == {"L-001"}
    assert load_registry(out / REGISTRY_FILE)["L-001"].max_samples == 500
    _, _, iterations, salt, _ = new_lines["L-001"].split("$")
    password = mqtt_password(load_secret_file(secret_path(out, "L-001")))
    assert new_lines["L-001"] == hash_password(
        password, salt=base64.b64decode(salt), iterations=int(iterations)
    )


def test_registry_refuses_a_bad_ceiling(tmp_path: Path) -> None:
    out = provisioned(tmp_path)
    records = load_registry(out / REGISTRY_FILE)
    save_registry(out / REGISTRY_FILE, [replace(r, sample_ceiling=0) for r in records.values()])
    with pytest.raises(RegistryError, match="sample_ceiling"):
        load_registry(out / REGISTRY_FILE)
