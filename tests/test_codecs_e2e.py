"""Sub-byte codecs on the real path: profiles that send updates as 1-bit signs and take
the global model as a 2-bit rotated delta, a Mosquitto broker, ``takfl-coordinator
serve`` and one ``takfl-agent run`` process per client (agents restarting with and
without their codec state: ``tests/test_codecs_mqtt.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.testbed import federation, metrics, read_state
from edge_agent.codec_state import MODELS_DIR, RESIDUAL_FILE
from takfl.run_layout import TELEMETRY_FILE
from tests.brokers import MOSQUITTO_MISSING

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        MOSQUITTO_MISSING,
        reason="mosquitto is not installed (apt-get install mosquitto); .ci/install installs it",
    ),
]

COMMS = {"compression": "sign1:density=0.6", "downstream": "rot2"}
ROUNDS = 4


def round_records(run_dir: Path) -> dict[int, dict]:  # type: ignore[type-arg]
    import json

    lines = (run_dir / TELEMETRY_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return {r["round"]: r for r in records if r["kind"] == "round"}


def test_sign_updates_and_delta_globals_cross_a_real_federation(tmp_path: Path) -> None:
    with federation(tmp_path, "mosquitto", rounds=ROUNDS, comms=COMMS) as fed:
        state_dirs = {
            a: tmp_path / "agents" / a for a in ("S-000", "S-001", "M-000", "M-001", "L-000")
        }
        for agent, folder in state_dirs.items():
            fed.start_agent(agent, extra=("--state-dir", str(folder)))
        coord = fed.start_coordinator("--deadline", "240", "--wait-all", "300")
        assert coord.wait(900) == 0, fed.logs()

        state = read_state(fed.run_dir)
        assert state["round"] == ROUNDS and state["phase"] == "finished"
        served = metrics(fed.run_dir)
        assert all(r["clients"] == r["sampled"] for r in served), served

        rounds = round_records(fed.run_dir)
        later = range(2, ROUNDS + 1)
        for proto in ("S", "M", "L"):
            full = rounds[1]["bytes_down"][proto]  # every agent of the tier: a full model
            down = [rounds[r]["bytes_down"][proto] for r in later]
            up = [rounds[r]["bytes_up"][proto] for r in rounds]
            # one bit for 60 % of the entries: far below a twentieth of the full model
            assert all(0 < b <= 0.05 * full for b in up), (proto, rounds)
            # every later global a 2-bit delta against the model each agent holds
            assert all(0 < b <= 0.1 * full for b in down), (proto, rounds)
        assert "refused its task" not in fed.log("coordinator-0")

        # the same federation in process, with the same codecs both ways: the same
        # accuracy, up to float summation order across processes
        simulated = {
            (r["round"], r["prototype"]): r["test_accuracy"] for r in fed.simulate(tmp_path / "sim")
        }
        deployed = {(r["round"], r["prototype"]): r["test_accuracy"] for r in served}
        assert deployed.keys() == simulated.keys()
        for key, acc in deployed.items():
            assert acc == pytest.approx(simulated[key], abs=0.5), (key, deployed, simulated)
        for agent, folder in state_dirs.items():
            codec = folder / "codec"
            assert (codec / RESIDUAL_FILE).exists(), agent
            assert len(list((codec / MODELS_DIR).glob("*.safetensors"))) >= 2, agent
