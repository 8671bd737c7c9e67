"""``takfl-coordinator demo``: embedded broker, a coordinator, one agent process per client.

Everything runs on this machine over real MQTT on loopback; the agents are
separate ``takfl-agent run`` processes holding their demo shard of the data.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.broker.embedded import EmbeddedBroker
from coordinator.engine import RoundResult
from coordinator.registry import provision_agents, secret_path
from coordinator.serve import COORDINATOR_USER, ServeSettings, embedded_access, serve
from coordinator.testbed import agent_command, fleet_agents, loopback_url, stop_processes
from takfl.config import FederationConfig

AGENT_LOGS = "agents"  # RUN/agents/<agent id>.log: each demo agent's output


@dataclass(kw_only=True)
class DemoSettings:
    config_name: str  # bundled name or path, handed to the agents too
    rounds: int = 3
    deadline_s: float = 90.0
    agent_threads: int = 1
    export: bool = False


def start_agents(
    cfg: FederationConfig, cfg_ref: str, run_dir: Path, port: int, threads: int
) -> list[subprocess.Popen[bytes]]:
    """One process per configured client; logs in RUN/agents/<id>.log."""
    logs = run_dir / AGENT_LOGS
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for aid, profile, shard in fleet_agents(cfg):
        cmd = agent_command(
            profile=profile,
            broker=loopback_url(port),
            agent_id=aid,
            secret=secret_path(run_dir, aid),
            federation=cfg_ref,
            shard=shard,
            threads=threads,
        )
        with (logs / f"{aid}.log").open("wb") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    return procs


def run_demo(
    cfg: FederationConfig,
    run_dir: Path,
    demo: DemoSettings,
    device: torch.device,
    *,
    on_round: Callable[[RoundResult], None] | None = None,
    report: Callable[[str], None] = print,
) -> list[RoundResult]:
    """Provision, start broker and agents, serve ``demo.rounds`` rounds, stop everything."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    records = provision_agents(cfg, run_dir)
    password = secrets.token_hex(16)  # the coordinator's login; never leaves this process
    access = embedded_access(cfg.name, {r.agent_id: r for r in records}, password)
    broker = EmbeddedBroker(access=access).start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs = start_agents(cfg, demo.config_name, run_dir, broker.port, demo.agent_threads)
        report(
            f"embedded broker on 127.0.0.1:{broker.port}; started {len(procs)} agent "
            f"processes (logs in {run_dir / AGENT_LOGS})"
        )
        settings = ServeSettings(
            broker=loopback_url(broker.port, COORDINATOR_USER),
            password=password,
            rounds=demo.rounds,
            deadline_s=demo.deadline_s,
            max_wait_s=demo.deadline_s,
            wait_all_s=180.0,
            wait_agents_s=180.0,
            export=demo.export,
        )
        return serve(cfg, run_dir, settings, device, on_round=on_round, report=report)
    finally:
        stop_processes(procs)
        broker.stop()
