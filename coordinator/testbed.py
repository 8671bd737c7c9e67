"""A local federation of real processes on this machine: a broker, ``takfl-coordinator
serve`` and one ``takfl-agent run`` per client, each a separate process with its own log.

``takfl-coordinator demo`` starts and stops its agents with :func:`agent_command` and
:func:`stop_processes`; the end-to-end tests and the benchmarks that run a real federation
use :func:`federation`:

    with federation(tmp_path, "mosquitto", rounds=2) as fed:
        fed.start_all_agents()
        coord = fed.start_coordinator("--deadline", "120")
        coord.wait(600)
        records = metrics(fed.run_dir)

Every process is stopped when the block ends, also when it raises. Agents are only
ever started as processes (by module name), never imported: the coordinator package
does not import the agent's.
"""

from __future__ import annotations

import getpass
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from coordinator.broker.mosquitto import MosquittoFiles, MosquittoProcess
from coordinator.broker.net import LOOPBACK, free_port
from coordinator.registry import secret_path
from coordinator.serve import COORDINATOR_USER, provision
from coordinator.store import RunStore, RunStoreError
from takfl.config import FederationConfig, load_federation, load_profile
from takfl.federation_data import client_id

# One thread per process keeps runs reproducible and lets 2-core machines cope.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# -- processes (shared with the demo) ------------------------------------------------------------
def loopback_url(port: int, user: str | None = None) -> str:
    """The broker URL of ``port`` on this machine, with ``user`` when given."""
    return f"mqtt://{user + '@' if user else ''}{LOOPBACK}:{port}"


def agent_command(
    *,
    profile: str,
    broker: str,
    agent_id: str,
    secret: Path,
    federation: str,
    shard: int,
    threads: int,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``takfl-agent run`` command line of one demo agent: ``federation`` (a bundled
    name or a path) gives it its demo ``shard`` of the data; ``extra`` options follow
    (e.g. ``--release-root``, ``--state-dir`` and ``--serve``)."""
    return [
        sys.executable,
        "-m",
        "edge_agent.cli",
        "run",
        "--profile",
        profile,
        "--broker",
        broker,
        "--id",
        agent_id,
        "--secret-file",
        str(secret),
        "--federation",
        federation,
        "--demo-shard",
        str(shard),
        "--threads",
        str(threads),
        *extra,
    ]


def fleet_agents(cfg: FederationConfig) -> Iterator[tuple[str, str, int]]:
    """(agent id, profile, demo shard) of every configured client, prototype by prototype."""
    for p in cfg.prototypes:
        for k in range(p.clients):
            yield client_id(p.name, k), p.profile, k


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """Terminate every process still running, wait up to ``timeout`` seconds for all of
    them together, then kill those left."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    end = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- reading a run -------------------------------------------------------------------------------
def wait_until(check: Callable[[], bool], timeout: float, what: str, step: float = 0.2) -> None:
    """Poll ``check`` every ``step`` seconds; TimeoutError naming ``what`` after ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def read_state(run_dir: Path) -> dict[str, Any]:
    """The run's state as the coordinator last committed it; ``{}`` while it has none."""
    store = RunStore(run_dir)
    try:
        return dict(store.read_state()) if store.exists() else {}
    except (RunStoreError, OSError):
        return {}


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every metrics record of the run (or of a ``simulate`` output) as written."""
    return RunStore(run_dir).metrics_records()


# -- the federation ------------------------------------------------------------------------------
def small_federation(
    tmp_path: Path,
    name: str = "digits-e2e",
    rounds: int = 2,
    clients: tuple[int, int, int] = (2, 2, 1),
    comms: Mapping[str, Any] | None = None,
) -> Path:
    """Write the config of digits with 2 S, 2 M and 1 L client (or ``clients``), everyone
    sampled every round, short distillation, to ``tmp_path/<name>.yaml``; its path.
    ``comms``: settings of every prototype's device profile's ``comms`` to change (e.g.
    ``{"compression": "sign1", "downstream": "rot2"}``), written as profile files
    beside the config."""
    cfg = load_federation("digits").model_dump(mode="json")
    cfg["name"] = name
    cfg["rounds"] = rounds
    for proto, count in zip(cfg["prototypes"], clients, strict=True):
        proto["clients"] = count
        proto["sample_rate"] = 1.0
        if comms:
            profile = load_profile(proto["profile"]).model_dump(mode="json")
            profile["comms"] |= dict(comms)
            path = tmp_path / f"{name}-{proto['name']}.profile.yaml"
            path.write_text(yaml.safe_dump(profile))
            proto["profile"] = str(path)
    cfg["algorithm"]["distill"]["steps"] = 10
    cfg["algorithm"]["lambdas"]["search_candidates"] = 4
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@dataclass(kw_only=True)
class Federation:
    """Processes of one local federation; everything is stopped by ``close``."""

    cfg_path: Path
    cfg: FederationConfig
    work: Path  # provisioned files (secrets, registry, passwords), logs/ and run/
    broker_url_agents: str
    broker_url_coordinator: str  # "embedded": the coordinator starts the broker itself
    port: int
    service_port: int  # monitors and the release service (Mosquitto's service listener)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    mosquitto: MosquittoProcess | None = None

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    def log(self, name: str) -> str:
        """What process ``name`` wrote so far ("" before it started)."""
        path = self.work / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        """The tail of every process's log, for a failure message."""
        return "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.procs)

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        if name in self.procs:
            # Every process must stay reachable, or close() could not stop it.
            raise ValueError(f"a process named {name!r} is already running in this federation")
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
        extra: Sequence[str] = (),
        broker: str | None = None,
        prefix: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """``takfl-agent run`` for ``agent_id`` (e.g. ``M-001``): by default its
        prototype's profile, the shard of its index, its provisioned secret and the
        federation's broker; ``extra`` options follow; ``prefix`` runs it under another
        command (e.g. ``ip netns exec NS``)."""
        proto, _, idx = agent_id.rpartition("-")
        command = agent_command(
            profile=profile or next(p.profile for p in self.cfg.prototypes if p.name == proto),
            broker=broker or self.broker_url_agents,
            agent_id=agent_id,
            secret=secret or secret_path(self.work, agent_id),
            federation=str(self.cfg_path),
            shard=shard if shard is not None else int(idx),
            threads=1,
            extra=extra,
        )
        return self._spawn(agent_id, [*prefix, *command])

    def start_all_agents(self) -> None:
        for agent_id, _, _ in fleet_agents(self.cfg):
            self.start_agent(agent_id)

    def start_module(self, name: str, module: str, *args: str) -> subprocess.Popen[bytes]:
        """Any ``python -m module args`` process (e.g. a hostile agent), logged as ``name``."""
        return self._spawn(name, [sys.executable, "-m", module, *args])

    def agent_args(self, agent_id: str) -> list[str]:
        """``--broker``, ``--id``, ``--secret-file`` and ``--federation`` of a provisioned
        agent, for a process that speaks for it (see :meth:`start_module`)."""
        secret = secret_path(self.work, agent_id)
        return [
            *("--broker", self.broker_url_agents, "--id", agent_id),
            *("--secret-file", str(secret), "--federation", str(self.cfg_path)),
        ]

    def serve_args(self, *extra: str, broker: str | None = None) -> list[str]:
        """``serve`` and its options for this federation on CPU, without export (the
        arguments of ``python -m coordinator.cli``)."""
        url = broker or self.broker_url_coordinator
        if url != "embedded" and "--password-file" not in extra:
            extra = (*extra, "--password-file", str(self.work / "coordinator.password"))
        return [
            "serve",
            *("--config", str(self.cfg_path), "--broker", url, "--run-dir", str(self.run_dir)),
            *("--agents", str(self.work / "agents.json"), "--device", "cpu", "--no-export"),
            *("--port", str(self.port), *extra),
        ]

    def next_coordinator(self) -> str:
        """``coordinator-<n>``: n counts the coordinators started, restarts included."""
        return f"coordinator-{sum(1 for n in self.procs if n.startswith('coordinator'))}"

    def start_coordinator(self, *extra: str, broker: str | None = None) -> subprocess.Popen[bytes]:
        """``takfl-coordinator serve`` of this federation (:meth:`serve_args`), logged as
        :meth:`next_coordinator`."""
        command = [sys.executable, "-m", "coordinator.cli", *self.serve_args(*extra, broker=broker)]
        return self._spawn(self.next_coordinator(), command)

    def simulate(self, out: Path) -> list[dict[str, Any]]:
        """The same federation run in process by ``simulate`` (TAKFL, same seed, partition,
        training function and wire codec, every client honest); its metrics records."""
        from coordinator.simulate import SimulationSpec, run_simulation
        from takfl.algorithms import resolve_algorithm

        torch.set_num_threads(1)
        cfg = load_federation(self.cfg_path)
        spec = SimulationSpec(
            algorithms=[resolve_algorithm(cfg.algorithm, "takfl")],
            seeds=1,
            rounds=cfg.rounds,
            compression="profile",
            downstream="profile",
        )
        run_simulation(cfg, spec, out, torch.device("cpu"))
        return metrics(out)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to process ``name`` (if still running) and wait for it."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(30)

    def close(self) -> None:
        """Stop every process, then Mosquitto when this federation started it."""
        stop_processes(self.procs.values(), timeout=15.0)
        if self.mosquitto is not None:
            self.mosquitto.stop()


@contextmanager
def federation(
    tmp_path: Path,
    broker: str,
    rounds: int = 2,
    clients: tuple[int, int, int] = (2, 2, 1),
    comms: Mapping[str, Any] | None = None,
) -> Iterator[Federation]:
    """Provision a small digits federation (:func:`small_federation`) under ``tmp_path``
    and its broker: ``mosquitto`` with generated passwords and ACL, started here, or
    ``embedded``, started by the coordinator itself. Everything stops on exit."""
    cfg_path = small_federation(tmp_path, rounds=rounds, clients=clients, comms=comms)
    cfg = load_federation(cfg_path)
    work = tmp_path / "fed"
    port = free_port()
    mosquitto = broker == "mosquitto"
    _, files, _ = provision(
        cfg,
        work,
        mosquitto_port=port if mosquitto else None,
        mosquitto_user=getpass.getuser(),
        service_port=free_port() if mosquitto else None,
    )
    fed = Federation(
        cfg_path=cfg_path,
        cfg=cfg,
        work=work,
        broker_url_agents=loopback_url(port),
        broker_url_coordinator=loopback_url(port, COORDINATOR_USER) if mosquitto else "embedded",
        port=port,
        service_port=files.service_port or port if isinstance(files, MosquittoFiles) else port,
    )
    if isinstance(files, MosquittoFiles):
        fed.mosquitto = MosquittoProcess(files).start()
    try:
        yield fed
    finally:
        fed.close()
