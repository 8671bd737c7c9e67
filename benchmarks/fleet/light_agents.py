"""Light agents: real ``AgentLink`` clients (one MQTT connection each) that do not train.

A worker process serves its share of the agents from one loop: it connects them on
``go``, answers every task at once with the global state plus a small deterministic
perturbation (a valid, non-zero delta), and on ``stop`` closes them and reports their
counters.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.fleet.control import (
    EOF,
    GO,
    READY,
    STARTED,
    STOP,
    STOPPED,
    await_command,
    exit_on_sigterm,
    read_commands,
    say,
)
from edge_agent.link import AgentIdentity, AgentLink, ReceivedTask
from takfl.mqtt.client import MqttSettings
from takfl.mqtt.credentials import mqtt_password

PERTURBATION = 1e-3
MQTT_COUNTERS = ("dropped", "publish_refused", "disconnects", "handler_errors")
Served = tuple[int, AgentLink, int]  # (agent index, link, num_samples)


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``state`` + PERTURBATION * sin(0.618 * (i + seed)) on every floating tensor."""
    out = {}
    for name, v in state.items():
        if v.is_floating_point():
            wave = torch.arange(v.numel(), dtype=torch.float32).add_(seed).mul_(0.618).sin_()
            out[name] = v + PERTURBATION * wave.reshape(v.shape).to(v.dtype)
        else:
            out[name] = v
    return out


def make_links(spec: dict[str, Any]) -> list[Served]:
    """An unstarted link per agent of the spec, logging in with its own secret."""
    links = []
    for a in spec["agents"]:
        secret = bytes.fromhex(a["secret_hex"])
        settings = MqttSettings(
            host=spec["host"],
            port=spec["port"],
            username=a["agent_id"],
            password=mqtt_password(secret),
        )
        identity = AgentIdentity(
            agent_id=a["agent_id"],
            prototype=a["prototype"],
            secret=secret,
            profile=a["profile"],
            hardware_class=a["hardware_class"],
            num_samples=a["num_samples"],
        )
        links.append((a["index"], AgentLink(settings, spec["fleet"], identity), a["num_samples"]))
    return links


def connect(links: list[Served], timeout_s: float) -> dict[str, Any]:
    """Start every link; how many were connected within ``timeout_s`` and how long it took."""
    t0 = time.perf_counter()
    for _, link, _ in links:
        link.start(timeout=None)
    end = t0 + timeout_s
    ready = sum(link.client.wait_ready(max(0.0, end - time.perf_counter())) for _, link, _ in links)
    return {"connected": ready, "connect_s": time.perf_counter() - t0}


def answer_tasks(links: list[Served], commands: queue.Queue[str]) -> int:
    """Answer every task at once until the orchestrator says stop (or goes away); the
    number of updates sent."""
    answered = 0
    while True:
        with contextlib.suppress(queue.Empty):
            if commands.get_nowait() in (STOP, EOF):
                return answered
        busy = False
        for index, link, n in links:
            task: ReceivedTask | None = link.next_task(0.0)
            if task is not None:
                seed = task.message.round_id * 100_003 + index
                link.send_update(task, perturbed(task.global_state, seed), num_samples=n)
                answered += 1
                busy = True
        if not busy:
            time.sleep(0.005)


def link_counters(links: list[Served], answered: int) -> dict[str, int]:
    """The links' counters and their MQTT clients' (``mqtt_*``), summed over the agents."""
    counters: dict[str, int] = {"answered": answered}
    for _, link, _ in links:
        for k, v in asdict(link.counters).items():
            counters[k] = counters.get(k, 0) + v
        for k in MQTT_COUNTERS:
            counters[f"mqtt_{k}"] = counters.get(f"mqtt_{k}", 0) + getattr(link.client.counters, k)
    return counters


def worker_main(spec_path: Path) -> int:
    """Serve a share of the agents: connect on ``go``, answer every task at once, stop on
    ``stop`` (or when the orchestrator's pipe closes); report link counters."""
    exit_on_sigterm()
    torch.set_num_threads(1)
    spec = json.loads(spec_path.read_text())
    commands = read_commands(sys.stdin)
    links = make_links(spec)
    say(READY)
    try:
        await_command(commands, GO, spec["startup_timeout_s"])
        say(STARTED, connect(links, spec["connect_timeout_s"]))
        answered = answer_tasks(links, commands)
    finally:
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda item: item[1].close(), links))
    say(STOPPED, link_counters(links, answered))
    return 0
