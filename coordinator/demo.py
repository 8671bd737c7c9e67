"""``takfl-coordinator demo``: embedded broker, a coordinator, one agent process per client.

Everything runs on this machine over real MQTT on loopback; the agents are
separate ``takfl-agent run`` processes holding their demo shard of the data. When the
rounds are done, the demo releases every tier's final model to its devices (export,
signed release, staged rollout, install and health check on every agent) and asks each
agent's local inference endpoint for a few predictions on test samples.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coordinator.broker.embedded import EmbeddedBroker
from coordinator.broker.net import free_port
from coordinator.deploy.command import ReleaseSettings, release
from coordinator.deploy.rollout import Rollout
from coordinator.deploy.service import RELEASE_USER
from coordinator.engine import RoundResult
from coordinator.registry import provision_agents, secret_path
from coordinator.serve import COORDINATOR_USER, ServeSettings, embedded_access, serve
from coordinator.testbed import agent_command, fleet_agents, loopback_url, stop_processes
from takfl.config import FederationConfig
from takfl.federation_data import build_federation_data
from takfl.release.keys import ROOT_FILE, generate_release_key
from takfl.run_layout import device_dir

PREDICTIONS = 4  # test samples each agent is asked about
AGENT_LOGS = "agents"  # RUN/agents/<agent id>.log: each demo agent's output


@dataclass(kw_only=True)
class DemoSettings:
    config_name: str  # bundled name or path, handed to the agents too
    rounds: int = 3
    deadline_s: float = 90.0
    agent_threads: int = 1
    export: bool = False
    release: bool = True  # release every tier's final model and ask the agents for predictions


@dataclass(frozen=True, kw_only=True)
class DemoAgent:
    agent_id: str
    prototype: str
    port: int  # of its local inference endpoint (127.0.0.1)
    process: subprocess.Popen[bytes]


def release_args(run_dir: Path, agent_id: str, port: int) -> list[str]:
    """``takfl-agent run`` options that make an agent install releases and serve them."""
    return [
        *("--release-root", str(run_dir / ROOT_FILE)),
        *("--state-dir", str(device_dir(run_dir, agent_id))),
        *("--serve", f"127.0.0.1:{port}"),
    ]


def start_agents(
    cfg: FederationConfig, run_dir: Path, port: int, demo: DemoSettings
) -> list[DemoAgent]:
    """One process per configured client, each serving inference on a free loopback port
    when the demo releases; logs in RUN/agents/<id>.log."""
    logs = run_dir / AGENT_LOGS
    logs.mkdir(parents=True, exist_ok=True)
    agents = []
    for aid, profile, shard in fleet_agents(cfg):
        serve_port = free_port()
        cmd = agent_command(
            profile=profile,
            broker=loopback_url(port),
            agent_id=aid,
            secret=secret_path(run_dir, aid),
            federation=demo.config_name,
            shard=shard,
            threads=demo.agent_threads,
            extra=release_args(run_dir, aid, serve_port) if demo.release else (),
        )
        with (logs / f"{aid}.log").open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        agents.append(
            DemoAgent(agent_id=aid, prototype=aid.rpartition("-")[0], port=serve_port, process=proc)
        )
    return agents


def predict(port: int, x: torch.Tensor, timeout_s: float = 10.0) -> dict[str, Any]:
    """One request to an agent's local endpoint: (N, C, H, W) inputs already normalised."""
    body = json.dumps({"inputs": x.tolist(), "normalised": True}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/predict",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def ask_agents(
    cfg: FederationConfig, agents: list[DemoAgent], report: Callable[[str], None]
) -> list[dict[str, Any]]:
    """A few test samples to every agent's endpoint: what each answered, how fast."""
    data = build_federation_data(cfg, 0)  # the seed serve uses by default
    x, y = data.test_x[:PREDICTIONS], data.test_y[:PREDICTIONS]
    rows: list[dict[str, Any]] = []
    for agent in agents:
        t0 = time.perf_counter()
        try:
            answer = predict(agent.port, x)
        except (OSError, ValueError) as e:
            report(f"{agent.agent_id}: no prediction ({e})")
            rows.append({"agent": agent.agent_id, "error": str(e)})
            continue
        ms = (time.perf_counter() - t0) * 1e3
        got = [int(c) for c in answer.get("classes", [])]
        correct = sum(int(a == b) for a, b in zip(got, y.tolist(), strict=False))
        rows.append(
            {
                "agent": agent.agent_id,
                "release": answer.get("version"),
                "classes": got,
                "correct": correct,
                "ms": ms,
            }
        )
        report(
            f"{agent.agent_id}: release {answer.get('version')} predicted {got} for labels "
            f"{y.tolist()} ({correct}/{len(got)} right, {ms:.1f} ms over loopback HTTP)"
        )
    return rows


def release_to_agents(
    cfg: FederationConfig,
    run_dir: Path,
    port: int,
    password: str,
    agents: list[DemoAgent],
    report: Callable[[str], None],
) -> list[Rollout]:
    """Release every tier's final model (stages of half and all its devices), then ask
    every agent's inference endpoint for predictions."""
    report("releasing every tier's final model to its devices (export, sign, stage, install)")
    settings = ReleaseSettings(
        broker=loopback_url(port, RELEASE_USER),
        password=password,
        stages=(0.5, 1.0),
        abort_above=0.2,
        device_timeout_s=300.0,
        timeout_s=900.0,
    )
    rollouts = release(run_dir, None, settings, report=report)
    report("predictions served by the agents' local endpoints from their installed releases:")
    ask_agents(cfg, agents, report)
    return rollouts


def run_demo(
    cfg: FederationConfig,
    run_dir: Path,
    demo: DemoSettings,
    device: torch.device,
    *,
    on_round: Callable[[RoundResult], None] | None = None,
    report: Callable[[str], None] = print,
) -> list[RoundResult]:
    """Provision, start broker and agents, serve ``demo.rounds`` rounds, release the final
    models and ask the agents for predictions (unless ``demo.release`` is off), stop
    everything."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    records = provision_agents(cfg, run_dir)
    generate_release_key(run_dir)
    password = secrets.token_hex(16)  # the coordinator's login; never leaves this process
    release_password = secrets.token_hex(16)  # the release service's login, likewise
    registry = {r.agent_id: r for r in records}
    access = embedded_access(cfg.name, registry, password, release_password=release_password)
    broker = EmbeddedBroker(access=access).start()
    agents: list[DemoAgent] = []
    try:
        agents = start_agents(cfg, run_dir, broker.port, demo)
        report(
            f"embedded broker on 127.0.0.1:{broker.port}; started {len(agents)} agent "
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
        results = serve(cfg, run_dir, settings, device, on_round=on_round, report=report)
        if demo.release:
            release_to_agents(cfg, run_dir, broker.port, release_password, agents, report)
        return results
    finally:
        stop_processes(a.process for a in agents)
        broker.stop()
