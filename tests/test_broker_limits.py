"""The Mosquitto configuration provisioning writes is sized with the fleet: connections
per listener, the session queue, and the open files of the broker process."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from coordinator.broker.limits import (
    LIMITS_NAME,
    MIN_QUEUED,
    FleetLimits,
    open_files_allowed,
)
from coordinator.serve import provision
from takfl.config import load_federation


def listener_blocks(conf: str) -> dict[str, list[str]]:
    """``listener`` line -> the lines that follow it, up to the next listener."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in conf.splitlines():
        if line.startswith("listener "):
            current = blocks.setdefault(line, [])
        elif current is not None and line.strip():
            current.append(line)
    return blocks


def test_limits_grow_with_the_fleet() -> None:
    # Execute
    small, large = FleetLimits.for_agents(10), FleetLimits.for_agents(5_000)

    # Assert
    assert small.max_queued_messages == MIN_QUEUED
    assert large.max_connections >= 5_000 and large.max_queued_messages >= 64 * 5_000
    assert large.open_files > large.max_connections + large.service_connections
    with pytest.raises(ValueError):
        FleetLimits.for_agents(-1)


@pytest.mark.slow  # a real broker and seconds of waiting: the full suite runs it
def test_provision_sizes_the_broker_for_the_fleet(tmp_path: Path) -> None:
    # Prepare: the digits federation with 2,000 clients per prototype (6,000 agents)
    cfg = load_federation("digits")
    cfg = cfg.model_copy(
        update={"prototypes": [p.model_copy(update={"clients": 2_000}) for p in cfg.prototypes]}
    )
    limits = FleetLimits.for_agents(6_000)

    # Execute
    records, files, _ = provision(cfg, tmp_path, mosquitto_port=18830)

    # Assert
    assert len(records) == 6_000 and files is not None
    conf = files.conf.read_text()
    assert f"max_queued_messages {limits.max_queued_messages}" in conf
    blocks = listener_blocks(conf)
    assert f"max_connections {limits.max_connections}" in blocks["listener 18830 127.0.0.1"]
    assert f"max_connections {limits.service_connections}" in blocks["listener 18831 127.0.0.1"]
    dropin = (files.directory / LIMITS_NAME).read_text()
    assert "[Service]" in dropin and f"LimitNOFILE={limits.open_files}" in dropin
    assert files.open_files == limits.open_files


def test_the_broker_gets_at_most_the_hard_open_file_limit() -> None:
    # Prepare
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = soft if hard == resource.RLIM_INFINITY else hard

    # Execute
    modest, huge = open_files_allowed(soft + 1), open_files_allowed(10**9)

    # Assert
    assert modest == min(soft + 1, ceiling)
    assert huge == (10**9 if hard == resource.RLIM_INFINITY else hard)
    assert open_files_allowed(1) == soft  # never lowered
