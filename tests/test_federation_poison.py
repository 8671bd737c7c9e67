"""A real federation with hostile agents: the coordinator and honest agents as separate
processes over a real broker, and two provisioned agents that lie using only their own
secrets (``benchmarks/poison_agent.py``, also real processes).

L-001 sends, in round 1, its delta scaled by 1,000 while claiming 50 x its samples,
and in round 2 the scaled delta with its true count; S-001 claims zero samples. Every
prototype must stay finite, accuracy close to a clean run of the same federation, the
coordinator must finish, and every honest agent stay up.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.poison_agent import start_poison_agent
from coordinator.testbed import federation, metrics, read_state

pytestmark = pytest.mark.slow

HONEST = ("S-000", "M-000", "M-001", "L-000")


def test_poisoned_agents_leave_every_prototype_finite_and_accurate(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with federation(tmp_path, "embedded", rounds=2, clients=(2, 2, 2)) as fed:
        for aid in HONEST:
            fed.start_agent(aid)

        start_poison_agent(fed, "L-001", 1, ["1:1000:50", "2:1000:1"])
        start_poison_agent(fed, "S-001", 1, ["1:1:0", "2:1:0"])
        # A task's deadline also bounds how late an honest agent may answer: generous,
        # so that a loaded machine delays the rounds instead of dropping honest updates.
        coord = fed.start_coordinator(
            "--deadline", "90", "--quorum", "0.5", "--max-wait", "300", "--wait-all", "300"
        )
        assert coord.wait(1500) == 0, fed.logs()

        state = read_state(fed.run_dir)
        assert state["round"] == 2 and state["phase"] == "finished"
        log = fed.log("coordinator-0")
        for reason in ("sample_cap", "norm_bound", "no_samples"):
            assert reason in log, log[-3000:]
        assert "L-001" in fed.log("L-001") and "sample_cap" in fed.log("L-001")

        # every prototype's model is finite, every round
        for p in ("S", "M", "L"):
            for r in (1, 2):
                ckpt = load_file(str(fed.run_dir / "models" / p / f"round-{r}.safetensors"))
                assert all(bool(torch.isfinite(t).all()) for t in ckpt.values()), (p, r)
        served = {(m["round"], m["prototype"]): m for m in metrics(fed.run_dir)}
        assert len(served) == len(metrics(fed.run_dir)) == 6
        assert all(m["kept_previous"] is None for m in served.values())
        assert served[(1, "L")]["clients"] == served[(2, "L")]["clients"] == 1
        assert served[(1, "S")]["clients"] == 1

        # the honest agents are still running, with no error
        for aid in HONEST:
            assert fed.procs[aid].poll() is None, fed.log(aid)
            assert "Traceback" not in fed.log(aid), fed.log(aid)

        # the clean run: the same federation in process, every client honest
        clean = {
            (m["round"], m["prototype"]): m["test_accuracy"]
            for m in fed.simulate(tmp_path / "clean")
        }
        for p in ("S", "M", "L"):
            poisoned, reference = served[(2, p)]["test_accuracy"], clean[(2, p)]
            print(f"{p}: clean {reference:.2f}%, poisoned {poisoned:.2f}%")
            # without the bounds, every prototype fell to 8.06% (chance is 10%)
            assert poisoned >= reference - 15.0, (p, poisoned, reference)
