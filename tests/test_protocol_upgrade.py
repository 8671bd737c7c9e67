"""The rolling-upgrade rule of docs/protocol.md ("Versions"): agents and a coordinator of
two minor versions of one major complete a round together, in either mix, over a real
Mosquitto. The newer side is a test double (``tests.protocol_double``) speaking 1.1: it
adds an optional field to every message it sends, signed; the 1.0 side reads it
leniently and verifies the signature over it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from coordinator.registry import secret_path
from coordinator.testbed import (
    Federation,
    agent_command,
    federation,
    fleet_agents,
    metrics,
    read_state,
)
from takfl.mqtt.client import MqttClient, MqttSettings, unique_client_id
from takfl.wire.topics import Topics, Up
from tests.brokers import SKIP_NO_MOSQUITTO

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto, SKIP_NO_MOSQUITTO]
NEXT = "1.1"  # the double's version; this code speaks 1.0
CLIENTS = (1, 1, 1)


def retained(fed: Federation, topic_filter: str) -> list[dict[str, object]]:
    """The retained messages under ``topic_filter``, read through the monitor login."""
    settings = MqttSettings(
        port=fed.service_port,
        username="takfl-monitor",
        password=(fed.work / "monitor.password").read_text().strip(),
    )
    seen: list[dict[str, object]] = []
    client = MqttClient(settings, unique_client_id("takfl-monitor"), persistent=False)
    client.route(topic_filter, lambda _t, payload: seen.append(json.loads(payload)))
    client.start(timeout=10)
    time.sleep(2.0)
    client.stop()
    return seen


def assert_one_round_done(fed: Federation) -> None:
    state = read_state(fed.run_dir)
    assert state["round"] == 1 and state["phase"] == "finished", fed.logs()
    records = metrics(fed.run_dir)
    assert {r["prototype"]: r["sampled"] for r in records} == {"S": 1, "M": 1, "L": 1}
    assert all(r["clients"] == r["sampled"] for r in records), records


def test_agents_of_the_next_minor_complete_a_round_with_this_coordinator(
    tmp_path: Path,
) -> None:
    with federation(tmp_path, "mosquitto", rounds=1, clients=CLIENTS) as fed:
        # Prepare: every agent is a 1.1 double
        for agent_id, profile, shard in fleet_agents(fed.cfg):
            command = agent_command(
                profile=profile,
                broker=fed.broker_url_agents,
                agent_id=agent_id,
                secret=secret_path(fed.work, agent_id),
                federation=str(fed.cfg_path),
                shard=shard,
                threads=1,
            )
            fed.start_module(agent_id, "tests.protocol_double", NEXT, *command[2:])
        # Execute: a 1.0 coordinator
        coord = fed.start_coordinator("--deadline", "240", "--wait-all", "300")
        assert coord.wait(1200) == 0, fed.logs()
        # Assert: the round is done, no update refused; the agents spoke 1.1 with their
        # extra field (their retained statuses)
        assert_one_round_done(fed)
        assert "refused 0" in fed.log("coordinator-0"), fed.log("coordinator-0")
        statuses = retained(fed, Topics(fed.cfg.name).up_filter(Up.STATUS))
        assert len(statuses) == sum(CLIENTS)
        assert all(s["protocol"] == NEXT and "x_double" in s for s in statuses), statuses


def test_this_agent_completes_a_round_with_a_coordinator_of_the_next_minor(
    tmp_path: Path,
) -> None:
    with federation(tmp_path, "mosquitto", rounds=1, clients=CLIENTS) as fed:
        # Prepare: 1.0 agents
        fed.start_all_agents()
        # Execute: a 1.1 coordinator (a double)
        serve = fed.serve_args("--deadline", "240", "--wait-all", "300")
        coord = fed.start_module(
            fed.next_coordinator(), "tests.protocol_double", NEXT, "coordinator.cli", *serve
        )
        assert coord.wait(1200) == 0, fed.logs()
        # Assert: the round is done; every agent trained and was accepted; the
        # coordinator spoke 1.1 with its extra field
        assert_one_round_done(fed)
        for agent_id, _, _ in fleet_agents(fed.cfg):
            assert "round 1: trained" in fed.log(agent_id), fed.log(agent_id)
            assert "refused" not in fed.log(agent_id), fed.log(agent_id)
        (coordinator,) = retained(fed, Topics(fed.cfg.name).coordinator_status())
        assert coordinator["protocol"] == NEXT and "x_double" in coordinator
