"""Field trial on 64-bit ARM: the agent installed as a user would, in a Debian bookworm arm64
userland (the base of 64-bit Raspberry Pi OS) run by qemu-user-static, joining a real
federation whose Mosquitto broker and coordinator run on this (x86) host.

    sudo apt-get install -y qemu-user-static debootstrap binfmt-support mosquitto
    sudo nice -n 10 .venv/bin/python benchmarks/field_arm64.py [--fresh]

Steps (each timed):
1. ``debootstrap --arch=arm64 bookworm ROOT MIRROR`` (the mirror of this machine's apt
   sources), the host's CA bundle and resolv.conf copied in, /proc, /sys and /dev mounted
   (unmounted again on every exit). The board's CPU is a Cortex-A76 (Raspberry Pi 5), in
   qemu and in the root's /proc/cpuinfo (``arm64_board.BOARD_CPU`` says why).
2. The project's wheel built here and copied with ``constraints.txt`` into the root's
   /root; there, with an empty environment and no pip configuration, the README's board
   command: ``python3 -m venv ~/takfl && ~/takfl/bin/pip install -c constraints.txt
   "takfl_edge-*.whl[agent]"``. Install time, venv size, CUDA packages (must be none).
3. ``takfl-agent profiles``, ``import torch``, the agent's and the inference runtimes'
   imports and ``takfl-agent doctor`` timed in the root.
4. ``takfl-coordinator provision`` of a small digits federation (2 S, 1 M, 1 L agents,
   everyone every round), ``mosquitto -c`` of the generated config and ``takfl-coordinator
   serve`` on the host; every agent runs ``takfl-agent run`` inside the root on its shard
   (written as a .npz file, as a device holds its private data) to the last round, also
   installing releases (``--release-root`` the fleet's root.json, ``--state-dir``) and
   serving them on a loopback port (``--serve``).
5. After the last round, every tier's final model released to those agents over the same
   Mosquitto with the release login, in stages of half and all, and a few predictions asked
   of every agent's endpoint from the host (``benchmarks/arm64_release.py``).
6. Writes ``benchmarks/results/field_arm64.json`` and prints a table.

Every figure is emulation on this machine, not the speed of a board. It must run as root
(debootstrap, chroot, mounts). With ``--fresh`` the root is built again from nothing;
otherwise an existing root is reused for step 1, but the venv and pip's cache in it are
always removed first, so the install is measured from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.arm64_board import (  # noqa: E402
    BOARD_HOME,
    EMULATED_INFERENCE_THREADS,
    LATENCY_BUDGET_FACTOR,
    SUITE,
    VENV,
    apt_mirror,
    board_profile,
    build_root,
    build_wheel,
    chroot_cmd,
    install_agent,
    log,
    missing_prerequisite,
    mounted,
    probe_root,
    run,
    stage_profiles,
)
from benchmarks.arm64_release import print_release, release_args, release_phase  # noqa: E402
from coordinator.broker.net import free_port, wait_port  # noqa: E402
from coordinator.registry import secret_path  # noqa: E402
from coordinator.store import RunStore  # noqa: E402
from coordinator.testbed import stop_processes  # noqa: E402
from takfl.config import FederationConfig, load_federation  # noqa: E402
from takfl.federation_data import build_federation_data, client_id  # noqa: E402
from takfl.release.keys import ROOT_FILE  # noqa: E402

DEFAULT_ROOT = Path("/var/tmp/takfl-field-arm64/root")
FLEET = "field-arm64"
CLIENTS = {"S": 2, "M": 1, "L": 1}  # every prototype of the digits federation
# Board profiles per prototype: the digits federation's S tier is a phone that trains
# through ExecuTorch, which the board install (the agent extra) does not include.
BOARD_PROFILES = {"S": "raspberry-pi-4", "M": "raspberry-pi-5", "L": "workstation"}


def write_federation(work: Path, rounds: int) -> Path:
    """The digits federation with CLIENTS agents, everyone sampled every round."""
    cfg = load_federation("digits").model_dump(mode="json")
    cfg["name"] = FLEET
    cfg["rounds"] = rounds
    for proto in cfg["prototypes"]:
        proto["clients"] = CLIENTS[proto["name"]]
        proto["profile"] = BOARD_PROFILES[proto["name"]]
        proto["sample_rate"] = 1.0
    cfg["algorithm"]["distill"]["steps"] = 30
    path = work / f"{FLEET}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


Agent = tuple[str, str, int]  # agent id, profile, samples


def provision_trial(cfg_path: Path, fleet: Path, port: int) -> None:
    """``takfl-coordinator provision``: secrets, registry and Mosquitto config in ``fleet``."""
    run(
        [
            *(sys.executable, "-m", "coordinator.cli", "provision", "--config", str(cfg_path)),
            *("--out", str(fleet), "--mosquitto-port", str(port), "--mosquitto-user", "root"),
        ],
        cwd=REPO,
    )


def stage_boards(root: Path, cfg: FederationConfig, fleet: Path) -> list[Agent]:
    """Each agent's shard (a .npz file, as a device holds its private data) and secret,
    and the fleet's ``root.json`` (which verifies releases), copied into the root's
    ``~/trial``; (agent id, profile, samples) of every agent."""
    board_dir = root / "root" / "trial"
    shutil.rmtree(board_dir, ignore_errors=True)
    (board_dir / "data").mkdir(parents=True)
    shutil.copy2(fleet / ROOT_FILE, board_dir / ROOT_FILE)
    data = build_federation_data(cfg, 0)
    agents = []
    for proto in cfg.prototypes:
        for k in range(proto.clients):
            cid = client_id(proto.name, k)
            _, x, y = data.clients[cid]
            np.savez(board_dir / "data" / f"{cid}.npz", x=x.numpy(), y=y.numpy())
            shutil.copy2(secret_path(fleet, cid), board_dir / f"{cid}.secret")
            os.chmod(board_dir / f"{cid}.secret", 0o600)
            agents.append((cid, proto.profile, len(y)))
    return agents


class TrialProcesses:
    """The trial's long-running processes, each logging to ``logs/<name>.log``."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.logs.mkdir(exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.logs / f"{name}.log", "wb") as out:
            self.procs[name] = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env
            )

    def check_running(self, names: list[str]) -> None:
        """RuntimeError naming those of ``names`` that are no longer running."""
        gone = [n for n in names if self.procs[n].poll() is not None]
        if gone:
            raise RuntimeError(f"{', '.join(gone)} exited: see the logs in {self.logs}")

    def wait_for(self, name: str, poll_s: float = 2.0) -> int:
        """Wait for process ``name`` to exit; RuntimeError as soon as another one fails."""
        proc = self.procs[name]
        while proc.poll() is None:
            dead = [n for n, p in self.procs.items() if n != name and p.poll() not in (None, 0)]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} failed: see the logs in {self.logs}")
            time.sleep(poll_s)
        return proc.returncode

    def stop(self) -> None:
        """Terminate what still runs; kill what has not exited 20 s later."""
        stop_processes(self.procs.values(), timeout=20.0)


def coordinator_command(cfg_path: Path, fleet: Path, run_dir: Path, port: int) -> list[str]:
    """``takfl-coordinator serve`` on the host, patient with emulated agents (1 h limits)."""
    return [
        *(sys.executable, "-m", "coordinator.cli", "serve", "--config", str(cfg_path)),
        *("--broker", f"mqtt://takfl-coordinator@127.0.0.1:{port}"),
        *("--password-file", str(fleet / "coordinator.password"), "--run-dir", str(run_dir)),
        *("--agents", str(fleet / "agents.json"), "--device", "cpu", "--no-export"),
        *("--deadline", "3600", "--wait-all", "3600", "--max-wait", "3600"),
    ]


def board_command(
    root: Path, subcommand: str, agent: Agent, broker: str, *extra: str, env: dict[str, str]
) -> list[str]:
    """``takfl-agent <subcommand>`` of ``agent`` inside the root with its staged secret and
    the emulated copy of its profile, then ``extra``; ``env`` is added to the board user's
    environment."""
    cid, profile, _ = agent
    return chroot_cmd(
        root,
        *(f"{VENV}/bin/takfl-agent", subcommand, "--profile", board_profile(profile)),
        *("--broker", broker),
        *("--id", cid, "--secret-file", f"{BOARD_HOME}/trial/{cid}.secret", *extra),
        env=env,
    )


def run_doctor(root: Path, agent: Agent, broker: str, logs: Path) -> int:
    """The preflight a user runs first, on the first agent's board, with the coordinator
    up; its exit code (its output in ``logs/doctor.log``)."""
    extra = ("--fleet", FLEET, "--wait", "600")
    cmd = board_command(root, "doctor", agent, broker, *extra, env={"COLUMNS": "160"})
    doctor = subprocess.run(cmd, capture_output=True, text=True)
    (logs / "doctor.log").write_text(doctor.stdout + doctor.stderr)
    log(f"doctor in the root exited {doctor.returncode} (log: {logs}/doctor.log)")
    return doctor.returncode


def federation(root: Path, work: Path, rounds: int) -> dict[str, Any]:
    """Mosquitto and the coordinator here, the agents inside the root, to the last round;
    then the release to the agents (:func:`benchmarks.arm64_release.release_phase`)."""
    cfg_path = write_federation(work, rounds)
    cfg = load_federation(cfg_path)
    port = free_port()
    fleet = work / "fleet"
    provision_trial(cfg_path, fleet, port)
    agents = stage_boards(root, cfg, fleet)
    budgets = stage_profiles(root, sorted({profile for _, profile, _ in agents}))
    ports = {cid: free_port() for cid, _, _ in agents}  # each agent's inference endpoint
    procs = TrialProcesses(work / "logs")
    try:
        doctor_exit, wall_s = train_rounds(procs, root, cfg_path, agents, ports, port)
        state, per_agent = completed_run(work / "run", agents, rounds, procs.logs)
        procs.check_running(list(ports))
        released = release_phase(work / "run", fleet, port, ports, cfg)
    finally:
        procs.stop()
    return {
        "rounds": rounds,
        "rounds_completed": state.get("round"),
        "wall_s": round(wall_s, 1),
        "accuracy": state.get("accuracy"),
        "doctor_exit": doctor_exit,
        "emulated_profiles": {
            "inference_threads": EMULATED_INFERENCE_THREADS,
            "latency_budget_factor": LATENCY_BUDGET_FACTOR,
            "latency_budget_ms": budgets,
        },
        "agents": per_agent,
        "release": released,
    }


def train_rounds(
    procs: TrialProcesses,
    root: Path,
    cfg_path: Path,
    agents: list[Agent],
    ports: dict[str, int],
    port: int,
) -> tuple[int, float]:
    """Mosquitto on ``port`` and the coordinator of ``cfg_path`` here (the fleet and run
    folders beside it), the doctor and then every agent in the root (serving on its port
    of ``ports``), until the coordinator ends its last round; the doctor's exit code and
    the rounds' wall time. The agents keep running."""
    work = cfg_path.parent
    fleet = work / "fleet"
    broker_agents = f"mqtt://127.0.0.1:{port}"
    env_host = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    procs.spawn("mosquitto", ["mosquitto", "-c", str(fleet / "mosquitto" / "mosquitto.conf")])
    if not wait_port("127.0.0.1", port, 15):
        raise RuntimeError(f"mosquitto did not open port {port}: see {procs.logs}/mosquitto.log")
    procs.spawn("coordinator", coordinator_command(cfg_path, fleet, work / "run", port), env_host)
    doctor_exit = run_doctor(root, agents[0], broker_agents, procs.logs)
    for agent in agents:
        procs.spawn(agent[0], agent_run_command(root, agent, broker_agents, ports[agent[0]]))
    code = procs.wait_for("coordinator")
    if code != 0:
        raise RuntimeError(f"the coordinator exited {code}: {procs.logs}")
    return doctor_exit, time.monotonic() - start


def agent_run_command(root: Path, agent: Agent, broker: str, port: int) -> list[str]:
    """``takfl-agent run`` inside the root on the agent's own shard, installing releases
    and serving them on loopback ``port``; it runs until stopped (the release comes after
    the last round)."""
    data = f"{BOARD_HOME}/trial/data/{agent[0]}.npz"
    extra = ("--data", data, "--fleet", FLEET, "--threads", "1", *release_args(agent[0], port))
    # a crash under emulation leaves Python's stacks in the agent's log
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    return board_command(root, "run", agent, broker, *extra, env=env)


def completed_run(
    run_dir: Path, agents: list[Agent], rounds: int, logs: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The finished run's state and per-agent figures; RuntimeError when it stopped early
    or an agent lacks an update in some round."""
    state = RunStore(run_dir).read_state()
    per_agent = agent_figures(run_dir, agents)
    missing = [a["agent"] for a in per_agent if a["rounds"] < rounds]
    if state.get("round") != rounds or missing:
        lacking = f"; not every round has an update from {', '.join(missing)}" if missing else ""
        raise RuntimeError(
            f"the federation stopped at round {state.get('round')} of {rounds}{lacking}: see {logs}"
        )
    return dict(state), per_agent


def agent_figures(run_dir: Path, agents: list[Agent]) -> list[dict[str, Any]]:
    """Per agent, from the run's telemetry log (``RUN/telemetry.jsonl``; its ``update``
    records hold the accepted update's size and the agent's report): train seconds and
    update bytes per round, the codec, and the highest peak RSS."""
    updates: dict[str, list[dict[str, Any]]] = {cid: [] for cid, _, _ in agents}
    for rec in RunStore(run_dir).telemetry():
        if rec.get("kind") == "update" and rec.get("agent_id") in updates:
            updates[rec["agent_id"]].append(rec)
    out = []
    for cid, profile, samples in agents:
        recs = sorted(updates[cid], key=lambda r: r["round"])
        tel = [r.get("telemetry") or {} for r in recs]
        rss = [t["peak_rss_mb"] for t in tel if t.get("peak_rss_mb") is not None]
        out.append(
            {
                "agent": cid,
                "profile": profile,
                "samples": samples,
                "rounds": len(recs),
                "train_s": [round(t["train_s"], 1) for t in tel if t.get("train_s") is not None],
                "update_bytes": [r["upload_bytes"] for r in recs],
                "compression": recs[-1]["compression"] if recs else None,
                "peak_rss_mb": round(max(rss), 1) if rss else None,
            }
        )
    return out


def trial(root: Path, work: Path, mirror: str, fresh: bool, rounds: int) -> dict[str, Any]:
    """Every step of the trial in a fresh ``work`` folder; the JSON record."""
    result: dict[str, Any] = {
        "machine": "x86_64 host, 2 cores shared; arm64 userland under qemu-user-static",
        "emulated": True,
        "suite": SUITE,
        "mirror": mirror,
        "clients": CLIENTS,
    }
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log(f"root {root} ({'fresh' if fresh else 'reused if complete'}), mirror {mirror}")
    result["debootstrap_s"] = build_root(root, mirror, fresh)
    with ExitStack() as stack:
        stack.enter_context(mounted(root))
        wheel = build_wheel(work)
        result["install"] = install_agent(root, wheel)
        if result["install"]["cuda_packages"]:
            raise RuntimeError(f"CUDA packages installed: {result['install']['cuda_packages']}")
        result["probe"] = probe_root(root)
        result["federation"] = federation(root, work, rounds)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--work", type=Path, default=DEFAULT_ROOT.parent / "work")
    parser.add_argument("--fresh", action="store_true", help="debootstrap the root again")
    parser.add_argument("--mirror", default=None, help="Debian mirror (default: apt sources)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/field_arm64.json")
    args = parser.parse_args()
    if (problem := missing_prerequisite()) is not None:
        print(problem, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the mounts come off
    mirror = args.mirror or apt_mirror()
    result = trial(args.root, args.work, mirror, args.fresh, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    log(f"wrote {args.out}")
    return 0


def print_table(r: dict[str, Any]) -> None:
    inst, probe, fed = r["install"], r["probe"], r["federation"]
    print(
        f"\narm64 field trial (qemu emulation on x86, not board speed); {probe['machine']} "
        f"Python {probe['python']} glibc {probe['glibc']}, torch {inst['torch']}"
    )
    cuda = inst["cuda_packages"] or "none"
    print(
        f"install {inst['install_s']} s, venv {inst['venv_mb']} MB, "
        f"{inst['packages']} packages, CUDA packages: {cuda}"
    )
    print(
        f"takfl-agent profiles {probe['profiles_s']} s, import torch {probe['import_torch_s']} s,"
        f" import agent {probe['import_agent_s']} s, import onnxruntime "
        f"{probe['import_onnxruntime_s']} s, import ai_edge_litert {probe['import_litert_s']} s"
    )
    print(
        f"{'agent':6} {'profile':16} {'rounds':>6} {'train s/round':>14} "
        f"{'bytes/round':>12} {'peak RSS MB':>12}"
    )
    for a in fed["agents"]:
        train = "/".join(f"{t:.1f}" for t in a["train_s"])
        sent = "/".join(str(b) for b in a["update_bytes"])
        print(
            f"{a['agent']:6} {a['profile']:16} {a['rounds']:>6} {train:>14} {sent:>12} "
            f"{a['peak_rss_mb']:>12}"
        )
    print(
        f"rounds {fed['rounds_completed']}/{fed['rounds']} in {fed['wall_s']} s; "
        f"test accuracy {fed['accuracy']}"
    )
    print_release(fed["release"])


if __name__ == "__main__":
    sys.exit(main())
