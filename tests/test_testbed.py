"""coordinator.testbed without a broker: the agents' command line, the fleet it starts,
reading a run directory, and stopping processes that do and do not stop when asked."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.store import STATE_FILE, RunStore
from coordinator.testbed import (
    agent_command,
    fleet_agents,
    loopback_url,
    metrics,
    read_state,
    small_federation,
    stop_processes,
)
from takfl.config import load_federation


def test_agent_command_is_a_takfl_agent_run_line() -> None:
    # Prepare
    secret = Path("/fleet/secrets/M-001.secret")

    # Execute
    cmd = agent_command(
        profile="raspberry-pi-4",
        broker=loopback_url(1884),
        agent_id="M-001",
        secret=secret,
        federation="digits",
        shard=1,
        threads=2,
    )

    # Assert
    assert cmd[:4] == [sys.executable, "-m", "edge_agent.cli", "run"]
    flags = dict(zip(cmd[4::2], cmd[5::2], strict=True))
    assert flags == {
        "--profile": "raspberry-pi-4",
        "--broker": "mqtt://127.0.0.1:1884",
        "--id": "M-001",
        "--secret-file": str(secret),
        "--federation": "digits",
        "--demo-shard": "1",
        "--threads": "2",
    }


def test_loopback_url_names_the_user_only_when_given() -> None:
    assert loopback_url(1883) == "mqtt://127.0.0.1:1883"
    assert loopback_url(1883, "takfl-coordinator") == "mqtt://takfl-coordinator@127.0.0.1:1883"


def test_fleet_agents_lists_every_client_with_its_profile_and_shard(tmp_path: Path) -> None:
    # Prepare
    cfg = load_federation(small_federation(tmp_path, clients=(2, 1, 3)))
    profiles = {p.name: p.profile for p in cfg.prototypes}

    # Execute
    agents = list(fleet_agents(cfg))

    # Assert
    assert [a for a, _, _ in agents] == ["S-000", "S-001", "M-000", "L-000", "L-001", "L-002"]
    assert all(profile == profiles[a[0]] for a, profile, _ in agents)
    assert [shard for _, _, shard in agents] == [0, 1, 0, 0, 1, 2]


def test_small_federation_samples_every_client_every_round(tmp_path: Path) -> None:
    # Execute
    cfg = load_federation(small_federation(tmp_path, name="tiny", rounds=3))

    # Assert
    assert (cfg.name, cfg.rounds) == ("tiny", 3)
    assert [p.clients for p in cfg.prototypes] == [2, 2, 1]
    assert all(p.sample_rate == 1.0 for p in cfg.prototypes)


def test_a_run_without_state_reads_as_empty_then_as_committed(tmp_path: Path) -> None:
    # Prepare
    store = RunStore(tmp_path)
    empty_state, empty_metrics = read_state(tmp_path), metrics(tmp_path)
    record = {"round": 1, "prototype": "S", "test_accuracy": 50.0}

    # Execute
    store.write_state({"round": 1})
    store.commit_metrics(1, [record])

    # Assert
    assert (empty_state, empty_metrics) == ({}, [])
    assert read_state(tmp_path)["round"] == 1
    assert metrics(tmp_path) == [record]


def test_a_broken_state_file_reads_as_empty(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / STATE_FILE).write_text('["not", "a", "state"]')

    # Execute
    state = read_state(tmp_path)

    # Assert
    assert state == {}


@pytest.mark.timeout(60)
def test_stop_processes_terminates_and_kills_what_ignores_terminate() -> None:
    # Prepare
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    start = time.monotonic()

    # Execute
    stop_processes([polite, stubborn], timeout=1.0)

    # Assert
    assert polite.poll() is not None and stubborn.poll() is not None
    assert stubborn.returncode < 0  # killed by a signal, not exited
    assert time.monotonic() - start < 30
