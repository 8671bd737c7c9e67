"""Secure aggregation over a real federation: the coordinator and agent processes over
Mosquitto with ``serve --privacy secagg``. Every prototype's round completes as a secure
sum of all its sampled agents, and nothing the coordinator keeps in its run directory
holds an individual update (no pending update, no model but the globals); with
``secagg-dp`` the agents add their share of the noise and every round records epsilon."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.testbed import federation, fleet_agents, metrics, read_state
from tests.brokers import MOSQUITTO_MISSING

pytestmark = [
    pytest.mark.slow,
    pytest.mark.mosquitto,
    pytest.mark.skipif(MOSQUITTO_MISSING, reason="mosquitto is not installed"),
]


@pytest.mark.parametrize(
    ("rounds", "privacy"),
    [(1, ["--privacy", "secagg"]), (1, ["--privacy", "secagg-dp", "--epsilon", "8"])],
    ids=["secagg", "secagg-dp"],
)
def test_a_secure_aggregation_federation_over_mosquitto_completes(
    tmp_path: Path, rounds: int, privacy: list[str]
) -> None:
    with federation(tmp_path, "mosquitto", rounds=rounds, clients=(3, 2, 2)) as fed:
        fed.start_all_agents()
        coord = fed.start_coordinator("--deadline", "120", "--wait-all", "300", *privacy)

        assert coord.wait(600) == 0, fed.logs()

        served = metrics(fed.run_dir)
        state = read_state(fed.run_dir)
        assert state["round"] == rounds and state["phase"] == "finished", fed.logs()
        assert len(served) == 3 * rounds
        if "secagg-dp" in privacy:  # the clients' noise is accounted as central DP's
            for r in served:
                assert 0 < r["privacy"]["epsilon"] <= 8.0 * (1 + 1e-9), r
        for r in served:  # every sampled agent's input is in its prototype's sum
            assert r["clients"] == r["sampled"] >= 2 and not r["kept_previous"], r
        assert {r["prototype"]: r["clients"] for r in served} == {"S": 3, "M": 2, "L": 2}
        agents = [a for a, _, _ in fleet_agents(fed.cfg)]
        for path in fed.run_dir.rglob("*"):
            if path.is_file():
                assert "pending" not in path.parts, path  # no update kept for a resume
                if path.suffix in (".safetensors", ".pt", ".npz", ".bin"):
                    assert not any(a in path.name for a in agents), path
