"""A real federation over Mosquitto in which the S tier trains through ExecuTorch: the
coordinator builds and checks the S training program, the S agents (separate
processes, android-phone profile) fetch it by chunk request, train through the
runtime and send their updates through the normal path; one S agent on a torch-backend
profile takes part in the same rounds."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from coordinator.testbed import federation, metrics, read_state
from takfl.config import load_profile
from tests.brokers import MOSQUITTO_MISSING

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        MOSQUITTO_MISSING, reason="mosquitto is not installed; .ci/install installs it"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("executorch") is None,
        reason="executorch is not installed (pip install 'takfl-edge[executorch]'); CI installs it",
    ),
]


def test_s_tier_trains_through_executorch_over_mosquitto(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Prepare: S-001 runs the same phone profile with the torch backend
    phone = load_profile("android-phone").model_dump(mode="json")
    phone["training"]["backend"] = "torch"
    torch_phone = tmp_path / "phone-torch.yaml"
    torch_phone.write_text(yaml.safe_dump(phone))
    with federation(tmp_path, "mosquitto", rounds=2) as fed:
        for p in fed.cfg.prototypes:
            for k in range(p.clients):
                agent = f"{p.name}-{k:03d}"
                fed.start_agent(agent, profile=str(torch_phone) if agent == "S-001" else None)
        # Execute
        coord = fed.start_coordinator("--deadline", "120", "--wait-all", "300")
        # Assert: both rounds complete with every S agent's update accepted
        assert coord.wait(600) == 0, fed.logs()
        state = read_state(fed.run_dir)
        assert state["round"] == 2 and state["phase"] == "finished"
        s_rounds = [r for r in metrics(fed.run_dir) if r["prototype"] == "S"]
        assert [r["round"] for r in s_rounds] == [1, 2]
        assert all(r["clients"] == 2 for r in s_rounds), s_rounds
        assert "ExecuTorch training program" in fed.log("coordinator-0")
        executorch_log, torch_log = fed.log("S-000"), fed.log("S-001")
        for r in (1, 2):
            assert (
                f"round {r}: trained" in executorch_log and "through executorch" in executorch_log
            )
            assert f"round {r}: trained" in torch_log and "through torch" in torch_log
        assert "through executorch" not in torch_log
