"""Helpers for end-to-end federation tests: real brokers, real coordinator and agent processes."""

from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from coordinator.broker.mosquitto import MosquittoFiles, MosquittoProcess, find_mosquitto
from coordinator.broker.net import free_port
from coordinator.serve import provision
from coordinator.simulate import SimulationSpec, run_simulation
from takfl.algorithms import resolve_algorithm
from takfl.config import FederationConfig, load_federation
from takfl.federation_data import client_id
from takfl.run_layout import METRICS_FILE, RunLayoutError, read_run_state

MOSQUITTO_MISSING = find_mosquitto() is None
# One thread per process keeps runs reproducible and lets 2-core machines cope.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def small_federation(
    tmp_path: Path,
    name: str = "digits-e2e",
    rounds: int = 2,
    clients: tuple[int, int, int] = (2, 2, 1),
) -> Path:
    """Digits with 2 S, 2 M and 1 L client (or ``clients``), everyone sampled every round,
    short distillation."""
    cfg = load_federation("digits").model_dump(mode="json")
    cfg["name"] = name
    cfg["rounds"] = rounds
    for proto, count in zip(cfg["prototypes"], clients, strict=True):
        proto["clients"] = count
        proto["sample_rate"] = 1.0
    cfg["algorithm"]["distill"]["steps"] = 10
    cfg["algorithm"]["lambdas"]["search_candidates"] = 4
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def wait_until(check: Callable[[], bool], timeout: float, what: str, step: float = 0.2) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def read_state(run_dir: Path) -> dict:  # type: ignore[type-arg]
    try:
        return dict(read_run_state(run_dir))
    except (OSError, RunLayoutError):
        return {}


def metrics(run_dir: Path) -> list[dict]:  # type: ignore[type-arg]
    path = run_dir / METRICS_FILE
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@dataclass
class Federation:
    """Processes of one test federation; everything is stopped by ``close``."""

    cfg_path: Path
    cfg: FederationConfig
    work: Path
    broker_url_agents: str
    broker_url_coordinator: str
    port: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    mosquitto: MosquittoProcess | None = None

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    def log(self, name: str) -> str:
        path = self.work / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        if name in self.procs:
            # Every process must stay reachable, or close() could not stop it.
            raise ValueError(f"a process named {name!r} is already running in this test")
        (self.work / "logs").mkdir(exist_ok=True)
        out = (self.work / "logs" / f"{name}.log").open("ab")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV)
        out.close()
        self.procs[name] = proc
        return proc

    def start_agent(
        self,
        agent_id: str,
        *,
        profile: str | None = None,
        shard: int | None = None,
        secret: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        proto, _, idx = agent_id.rpartition("-")
        prof = profile or next(p.profile for p in self.cfg.prototypes if p.name == proto)
        return self._spawn(
            agent_id,
            [
                sys.executable,
                "-m",
                "edge_agent.cli",
                "run",
                "--profile",
                prof,
                "--broker",
                self.broker_url_agents,
                "--id",
                agent_id,
                "--secret-file",
                str(secret or self.work / "secrets" / f"{agent_id}.secret"),
                "--federation",
                str(self.cfg_path),
                "--demo-shard",
                str(shard if shard is not None else int(idx)),
                "--threads",
                "1",
            ],
        )

    def start_all_agents(self) -> None:
        for p in self.cfg.prototypes:
            for k in range(p.clients):
                self.start_agent(client_id(p.name, k))

    def start_module(self, name: str, module: str, *args: str) -> subprocess.Popen[bytes]:
        """Any ``python -m module args`` process (e.g. a hostile agent), logged as ``name``."""
        return self._spawn(name, [sys.executable, "-m", module, *args])

    def start_poison_agent(
        self, agent_id: str, shard: int, lies: Sequence[str]
    ) -> subprocess.Popen[bytes]:
        """A provisioned agent that lies (``tests/poison_agent.py``): each of ``lies`` is
        ``ROUND:SCALE:CLAIM`` (its delta times SCALE, CLAIM samples claimed in that round)."""
        return self.start_module(
            agent_id,
            "tests.poison_agent",
            "--broker",
            self.broker_url_agents,
            "--id",
            agent_id,
            "--secret-file",
            str(self.work / "secrets" / f"{agent_id}.secret"),
            "--federation",
            str(self.cfg_path),
            "--shard",
            str(shard),
            *[arg for lie in lies for arg in ("--lie", lie)],
        )

    def simulate(self, out: Path) -> list[dict]:  # type: ignore[type-arg]
        """The same federation run in process by ``simulate`` (TAKFL, same seed, partition,
        training function and wire codec, every client honest); its metrics records."""
        torch.set_num_threads(1)
        cfg = load_federation(self.cfg_path)
        spec = SimulationSpec(
            algorithms=[resolve_algorithm(cfg.algorithm, "takfl")],
            seeds=1,
            rounds=cfg.rounds,
            compression="profile",
        )
        run_simulation(cfg, spec, out, torch.device("cpu"))
        return metrics(out)

    def start_coordinator(self, *extra: str, broker: str | None = None) -> subprocess.Popen[bytes]:
        name = f"coordinator-{sum(1 for n in self.procs if n.startswith('coordinator'))}"
        url = broker or self.broker_url_coordinator
        if url != "embedded" and "--password-file" not in extra:
            extra = (*extra, "--password-file", str(self.work / "coordinator.password"))
        return self._spawn(
            name,
            [
                sys.executable,
                "-m",
                "coordinator.cli",
                "serve",
                "--config",
                str(self.cfg_path),
                "--broker",
                url,
                "--run-dir",
                str(self.run_dir),
                "--agents",
                str(self.work / "agents.json"),
                "--device",
                "cpu",
                "--no-export",
                "--port",
                str(self.port),
                *extra,
            ],
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(30)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.mosquitto is not None:
            self.mosquitto.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.procs)


@contextmanager
def federation(
    tmp_path: Path, broker: str, rounds: int = 2, clients: tuple[int, int, int] = (2, 2, 1)
) -> Iterator[Federation]:
    """Provision a small digits federation and its broker (``mosquitto`` with generated
    passwords and ACL, or ``embedded`` started by the coordinator itself)."""
    cfg_path = small_federation(tmp_path, rounds=rounds, clients=clients)
    cfg = load_federation(cfg_path)
    work = tmp_path / "fed"
    port = free_port()
    records, files, _ = provision(
        cfg,
        work,
        mosquitto_port=port if broker == "mosquitto" else None,
        mosquitto_user=getpass.getuser(),
    )
    del records
    fed = Federation(
        cfg_path,
        cfg,
        work,
        f"mqtt://127.0.0.1:{port}",
        f"mqtt://takfl-coordinator@127.0.0.1:{port}" if broker == "mosquitto" else "embedded",
        port,
    )
    if isinstance(files, MosquittoFiles):
        fed.mosquitto = MosquittoProcess(files).start()
    try:
        yield fed
    finally:
        fed.close()
