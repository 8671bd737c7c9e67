"""Central DP over a real federation: the coordinator and agent processes over Mosquitto
with ``serve --privacy central-dp``; every round records epsilon, the ledger is in the
run's state and ``status`` shows it."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.testbed import federation, metrics, read_state
from tests.brokers import MOSQUITTO_MISSING

pytestmark = [
    pytest.mark.slow,
    pytest.mark.mosquitto,
    pytest.mark.skipif(MOSQUITTO_MISSING, reason="mosquitto is not installed"),
]


def test_a_central_dp_federation_over_mosquitto_completes(tmp_path: Path) -> None:
    with federation(tmp_path, "mosquitto", rounds=2) as fed:
        fed.start_all_agents()
        coord = fed.start_coordinator(
            "--deadline", "120", "--wait-all", "300", "--privacy", "central-dp", "--epsilon", "8"
        )

        assert coord.wait(600) == 0, fed.logs()

        served = metrics(fed.run_dir)
        state = read_state(fed.run_dir)
        assert state["round"] == 2 and state["phase"] == "finished"
        assert {r["prototype"] for r in served} == {"S", "M", "L"}
        for r in served:
            assert 0 < r["privacy"]["epsilon"] <= 8.0 * (1 + 1e-9), r
            assert r["privacy"]["delta"] == 1e-5
        last = {r["prototype"]: r["privacy"]["epsilon"] for r in served if r["round"] == 2}
        assert state["privacy"]["prototypes"]["L"]["epsilon"] == pytest.approx(last["L"])
        out = CliRunner().invoke(app, ["status", "--run-dir", str(fed.run_dir)], terminal_width=200)
        assert out.exit_code == 0, out.output
        assert "epsilon L" in out.output
