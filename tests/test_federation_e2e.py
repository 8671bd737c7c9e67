"""A real federation: coordinator and agents as separate processes over real brokers.

Each test provisions secrets (and, for Mosquitto, a password file and per-agent
ACL), starts the broker, ``takfl-coordinator serve`` and ``takfl-agent run``
processes, and checks what lands in the run directory.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.testbed import federation, metrics, read_state, wait_until
from takfl.secret_files import write_secret_file
from tests.brokers import MOSQUITTO_MISSING

pytestmark = pytest.mark.slow
needs_mosquitto = pytest.mark.skipif(
    MOSQUITTO_MISSING,
    reason="mosquitto is not installed (apt-get install mosquitto); .ci/install installs it",
)


def process_cmdline(proc: subprocess.Popen[bytes]) -> bytes:
    """The process's argument vector as the kernel shows it to other users of the machine.

    Right after ``Popen`` returns, ``exec`` may not have set the new argument area up yet and
    ``/proc/PID/cmdline`` reads empty: wait for it rather than read a half-started process.
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        if cmdline:
            return cmdline
        time.sleep(0.05)
    raise AssertionError(f"no argument vector for pid {proc.pid} (exit code {proc.poll()})")


def by_round(records: list[dict]) -> dict[tuple[int, str], float]:  # type: ignore[type-arg]
    return {(r["round"], r["prototype"]): r["test_accuracy"] for r in records}


@needs_mosquitto
def test_mqtt_federation_matches_simulation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with federation(tmp_path, "mosquitto", rounds=2) as fed:
        fed.start_all_agents()
        # Every agent must be there for round 1, as every virtual client is in simulation.
        coord = fed.start_coordinator("--deadline", "120", "--wait-all", "300")
        # the broker password came from a file: no process argument shows it
        password = (fed.work / "coordinator.password").read_text().strip()
        cmdline = process_cmdline(coord)
        assert b"--password-file" in cmdline and password.encode() not in cmdline
        assert coord.wait(600) == 0, fed.logs()
        served = metrics(fed.run_dir)
        assert {r["prototype"]: r["sampled"] for r in served} == {"S": 2, "M": 2, "L": 1}
        state = read_state(fed.run_dir)
        assert state["round"] == 2 and state["phase"] == "finished"
        assert all(r["clients"] == r["sampled"] for r in served), served

        # status through the read-only monitor account sees every agent, online
        url = f"mqtt://takfl-monitor@127.0.0.1:{fed.service_port}"
        out = CliRunner().invoke(
            app,
            ["status", "--run-dir", str(fed.run_dir), "--broker", url, "--listen", "3"],
            terminal_width=200,
            env={"TAKFL_BROKER_PASSWORD": (fed.work / "monitor.password").read_text().strip()},
        )
        assert out.exit_code == 0, out.output
        for aid in ("S-000", "S-001", "M-000", "M-001", "L-000"):
            row = next(line for line in out.output.splitlines() if aid in line)
            assert "online" in row
        assert "finished" in out.output

        # The same engine in process: same seed, partition, training function and codec.
        simulated = by_round(fed.simulate(tmp_path / "sim"))
        deployed = by_round(served)
        assert deployed.keys() == simulated.keys()
        for key in deployed:
            # Identical up to floating-point summation order across processes.
            assert deployed[key] == pytest.approx(simulated[key], abs=0.5), (
                key,
                deployed,
                simulated,
            )


@needs_mosquitto
def test_coordinator_killed_mid_round_resumes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with federation(tmp_path, "mosquitto", rounds=3) as fed:
        fed.start_all_agents()
        fed.start_coordinator("--deadline", "120")
        wait_until(
            lambda: (
                read_state(fed.run_dir).get("round") == 1
                and read_state(fed.run_dir).get("phase") == "collecting"
            ),
            300,
            "round 2 to open",
        )
        wait_until(
            lambda: any((fed.run_dir / "pending" / "round-2").glob("*.safetensors")),
            120,
            "a persisted update of round 2",
        )
        fed.kill("coordinator-0", signal.SIGKILL)
        assert read_state(fed.run_dir)["round"] == 1

        resumed = fed.start_coordinator("--resume", "--deadline", "120")
        assert resumed.wait(400) == 0, fed.logs()
        state = read_state(fed.run_dir)
        assert state["round"] == 3 and state["phase"] == "finished"
        rounds = [r["round"] for r in metrics(fed.run_dir)]
        assert sorted(rounds) == [1, 1, 1, 2, 2, 2, 3, 3, 3]
        for r in (1, 2, 3):
            assert (fed.run_dir / "models" / "L" / f"round-{r}.safetensors").is_file()


@needs_mosquitto
def test_round_closes_at_deadline_with_quorum_when_an_agent_dies(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with federation(tmp_path, "mosquitto", rounds=1) as fed:
        fed.start_all_agents()
        coord = fed.start_coordinator("--deadline", "15", "--quorum", "0.5", "--max-wait", "60")
        wait_until(
            lambda: read_state(fed.run_dir).get("phase") == "collecting", 300, "round 1 to open"
        )
        fed.kill("M-001", signal.SIGKILL)
        assert coord.wait(300) == 0, fed.logs()
        m = {r["prototype"]: r for r in metrics(fed.run_dir)}
        assert m["M"]["sampled"] == 2
        assert m["M"]["clients"] <= 2 and m["M"]["clients"] >= 1
        assert read_state(fed.run_dir)["round"] == 1
        if m["M"]["clients"] == 1:
            assert "closes without" in fed.log("coordinator-0")


def test_early_agents_join_and_impostors_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with federation(tmp_path, "embedded", rounds=1) as fed:
        # Agents first: the broker (embedded in the coordinator) is not up yet.
        for aid in ("S-000", "M-000", "M-001", "L-000"):
            fed.start_agent(aid)
        unknown_secret = tmp_path / "unknown.secret"
        write_secret_file(unknown_secret)
        unknown = fed.start_agent("Z-000", profile="workstation", shard=0, secret=unknown_secret)
        # S-001 is provisioned for prototype S; this process claims M (a Raspberry Pi 5).
        wrong = fed.start_agent("S-001", profile="raspberry-pi-5", shard=1)
        coord = fed.start_coordinator("--deadline", "120", "--wait-all", "20")

        # the embedded broker itself refuses an agent that is not provisioned
        assert unknown.wait(300) == 3, fed.log("Z-000")
        assert "refused the login" in fed.log("Z-000")
        assert wrong.wait(300) == 3, fed.log("S-001")
        assert "wrong_prototype" in fed.log("S-001")
        assert coord.wait(400) == 0, fed.logs()
        state = read_state(fed.run_dir)
        assert state["round"] == 1 and state["phase"] == "finished"
        sampled = {r["prototype"]: (r["clients"], r["sampled"]) for r in metrics(fed.run_dir)}
        assert sampled == {"S": (1, 1), "M": (2, 2), "L": (1, 1)}
        assert "refused" in fed.log("coordinator-0")
