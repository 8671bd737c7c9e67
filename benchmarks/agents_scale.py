"""The coordinator against N light agents on one Mosquitto: registration, round overhead, memory.

    python benchmarks/agents_scale.py [--agents 100,500,1000,2000,5000] [--rounds 3]
        [--agents-per-worker 1000]

For every N, a fresh federation is provisioned (``coordinator.serve.provision``: agent
registry, per-agent secrets, Mosquitto password file and ACL) and one Mosquitto is
started. The coordinator side (``MqttTransport`` + ``RoundEngine``, algorithm ``fedavg``
so no distillation is timed) runs in its own process; the N agents are real
``AgentLink`` clients (one MQTT connection each, username = agent id), up to
``--agents-per-worker`` of them in each worker process, all served from one loop.

The federation: one prototype ``S`` (profile ``android-phone``: int8 update
compression, 128 KiB chunks) of N clients, sample rate 1.0 (every agent gets a task
every round), model ``mlp_digits`` with width 8 (610 parameters; ``--width``). The
coordinator's server data (test/validation/public 360/100/400) come from the digits
data set; the agents' shards are synthetic: agent i announces
``synthetic_samples(i)`` (8 to 71) samples, so N is not limited by the digits pool.
Agents do not train: each announces its shard size and answers a task at once with
the global state plus a deterministic perturbation of 1e-3 * sin(...) on every
floating tensor, so the update is a valid, non-zero delta. A worker process serves
``--agents-per-worker`` agents from one thread (``benchmarks.fleet.loop_client``).

Measured, per N:

1. register: from the coordinator transport's start (agents already imported and
   waiting) until its transport sees all N agents registered and online; the agents
   are released the moment the transport is connected. Also the time for a restarted
   coordinator transport to see all of them again from the retained presence and
   registration messages.
2. round: wall time of ``RoundEngine.run_round`` (tasks and global-model chunks out,
   update headers and chunks back, validation, reconstruction, aggregation, test
   evaluation, global announcement); median over ``--rounds``, and per agent. Next to
   it the coordinator process's CPU time per agent (all its threads) and the time in
   ``RoundEngine.absorb`` per agent (FedAvg fold plus teacher logits on the public set):
   on a small machine that also hosts the agents and the broker, the wall time is
   mostly waiting for them, the CPU time is what the coordinator itself spends.
3. memory of the coordinator process: peak RSS (``ru_maxrss``) after setup and after
   the timed rounds; the slope between N values (MB per extra agent), next to the size
   of one global model blob. Tracing slows allocation-heavy code by about a quarter,
   so the tracemalloc figures come from a separate untimed pass after the timed ones:
   another restarted transport takes in all N registrations (Python memory then held:
   the per-agent bookkeeping, with its largest allocation sites) and runs one more
   round (peak of Python allocations); ``--no-tracemalloc`` skips the pass.
   Tensors are not traced (torch allocates them outside Python's allocator).

The transport's and the agents' counters (messages dropped on a full inbox, chunks
asked for again, headers re-announced, refusals) go into the JSON: they show where a
round was slowed down by a recovery timer rather than by work.

4. overhead of a round: a round's wall time with no training in it (the agents answer
   at once), so all of it is coordination: tasks, signatures, transfers, checks,
   aggregation; messages deferred by the coordinator (its inbox full) and dropped by
   the broker (a client's queue full, from Mosquitto's log).
5. telemetry: the run's telemetry log (``TelemetryRecorder``) written by the
   coordinator for every registration, presence change and update: bytes per record.
6. ``takfl-coordinator status --broker`` (the monitor's login, service listener)
   run while every agent is online: seconds until it printed its table, agents listed.

The load average of the machine is recorded before and after each N.

Prints the command line, the machine and a table; writes benchmarks/results/agents_scale.json.
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
# First, for benchmarks.fleet: an installed distribution may ship a top-level package of the
# same name (opacus does), and this checkout's must win.
sys.path.insert(0, str(REPO))

from benchmarks.fleet.control import (  # noqa: E402
    DONE,
    GO,
    READY,
    STARTED,
    STOP,
    STOPPED,
    BenchError,
    Child,
    exit_on_sigterm,
)
from benchmarks.fleet.coordinator_side import coordinator_main  # noqa: E402
from benchmarks.fleet.light_agents import PERTURBATION, perturbed, worker_main  # noqa: E402
from benchmarks.fleet.results import (  # noqa: E402
    cell,
    goals,
    recovery_notes,
    results_table,
    slope_table,
    slopes,
    summarise,
)
from coordinator.broker import BrokerStartError, MosquittoProcess, find_mosquitto, free_port  # noqa: E402
from coordinator.broker.mosquitto import MosquittoFiles  # noqa: E402
from coordinator.registry import REGISTRY_FILE, RegistryEntry  # noqa: E402
from coordinator.serve import MONITOR_USER, provision  # noqa: E402
from takfl.config import ConfigError, load_federation, load_profile  # noqa: E402

__all__ = ["PERTURBATION", "ScaleOptions", "perturbed", "run"]

RESULTS = Path(__file__).resolve().parent / "results" / "agents_scale.json"
FLEET = "scale"
PROTOTYPE, PROFILE = "S", "android-phone"
BUILDER = "mlp_digits"
DATA = {"dataset": "digits", "test_size": 360, "validation_size": 100, "public_size": 400}
DATA_NOTE = (
    "one prototype S (android-phone: int8 deltas, 128 KiB chunks), N clients, sample rate "
    "1.0, mlp_digits (width in options); server data from digits (test/validation/public "
    "360/100/400); synthetic shards (agent i announces 8 + (i * 37) % 64 samples); agents "
    "do not train: each answers with the global state + 1e-3*sin(...) on every float tensor"
)


@dataclass(frozen=True, kw_only=True)
class ScaleOptions:
    rounds: int = 3  # timed rounds per N
    agents_per_worker: int = 1000  # AgentLinks served by one worker process (one thread)
    register_timeout_s: float = 180.0  # all N agents registered and online within this
    round_timeout_s: float = 120.0  # a round closes at this deadline with whoever answered
    startup_timeout_s: float = 180.0  # child processes imported and ready
    tracemalloc: bool = True  # trace Python allocations in the coordinator process
    width: int = 8  # hidden width of mlp_digits: 8 gives 610 parameters
    seed: int = 0
    # the federation's privacy section (None: plain), e.g. {"mode": "secagg"}
    privacy: dict[str, Any] | None = None
    drop_fraction: float = 0.0  # of the agents, leave each secure round after sharing
    restart: bool = True  # also time a restarted coordinator transport


# -- configuration -----------------------------------------------------------------------------
def federation_config(
    n: int, rounds: int, width: int = 8, privacy: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A valid federation of one prototype with ``n`` clients (see the module docstring)."""
    return ({"privacy": privacy} if privacy else {}) | {
        "name": "agents-scale",
        "description": f"{n} light agents of prototype {PROTOTYPE} on one Mosquitto",
        "data": DATA,
        "partition": {"alpha": 0.3, "min_per_client": 1, "seed": 0},
        "prototypes": [
            {
                "name": PROTOTYPE,
                "profile": PROFILE,
                "model": {"builder": BUILDER, "args": {"width": width}},
                "clients": n,
                "sample_rate": 1.0,
                "data_ratio": 1.0,
            },
        ],
        "rounds": rounds,
        "algorithm": {"name": "fedavg"},
    }


def synthetic_samples(index: int) -> int:
    """The shard size agent ``index`` announces: 8 to 71, spread deterministically."""
    return 8 + (index * 37) % 64


def agent_specs(records: list[RegistryEntry], drop_fraction: float = 0.0) -> list[dict[str, Any]]:
    """What a worker needs to serve each provisioned agent (its secret, its shard size,
    and whether it drops out of secure rounds: ``drop_fraction`` of them, spread
    evenly)."""
    hardware = load_profile(PROFILE).hardware_class
    dropping = round(drop_fraction * len(records))
    every = len(records) / dropping if dropping else 0.0
    drops = {int(k * every) for k in range(dropping)}
    return [
        {
            "index": i,
            "agent_id": r.agent_id,
            "prototype": r.prototype,
            "profile": r.profile,
            "secret_hex": r.secret_hex,
            "hardware_class": hardware,
            "num_samples": synthetic_samples(i),
            "drops": i in drops,
        }
        for i, r in enumerate(records)
    ]


# -- orchestration -----------------------------------------------------------------------------
def start_children(
    work: Path,
    files: MosquittoFiles,
    coordinator_spec: dict[str, Any],
    agents: list[dict[str, Any]],
    opts: ScaleOptions,
    children: list[Child],
) -> tuple[Child, list[Child]]:
    """The coordinator process and the workers sharing ``agents`` out (each appended to
    ``children`` as it starts, so that all of them are stopped); (coordinator, workers)."""
    script = Path(__file__).resolve()
    common = {
        "host": files.host,
        "port": files.port,
        "fleet": FLEET,
        "startup_timeout_s": opts.startup_timeout_s,
    }
    coordinator = Child("coordinator", "--coordinator", common | coordinator_spec, work, script)
    children.append(coordinator)
    workers = math.ceil(len(agents) / opts.agents_per_worker)
    share = math.ceil(len(agents) / workers)
    for w in range(workers):
        spec = {
            "agents": agents[w * share : (w + 1) * share],
            "connect_timeout_s": opts.register_timeout_s,
        }
        children.append(Child(f"worker-{w}", "--worker", common | spec, work, script))
    return coordinator, children[1:]


def drive(
    rec: dict[str, Any],
    coordinator: Child,
    pool: list[Child],
    opts: ScaleOptions,
    report: Callable[[str], None],
    status_spec: dict[str, str] | None = None,
) -> None:
    """Release the children phase by phase and gather their figures into ``rec``; with
    ``status_spec``, time ``takfl-coordinator status`` while every agent is online."""
    for c in [coordinator, *pool]:
        c.expect(READY, opts.startup_timeout_s)
    coordinator.send(GO)
    coordinator.expect(STARTED, 60.0)
    for w in pool:
        w.send(GO)
    # registration, restart and traced restart; the timed rounds and the traced one
    budget = 3 * opts.register_timeout_s + (opts.rounds + 1) * (opts.round_timeout_s + 60)
    rec |= coordinator.expect(DONE, budget, progress=report)
    connected = [w.expect(STARTED, 30.0) for w in pool]
    rec["agents_connected"] = sum(c["connected"] for c in connected)
    rec["worker_connect_s"] = max(c["connect_s"] for c in connected)
    if status_spec is not None:
        rec |= time_status(status_spec)
    for w in pool:
        w.send(STOP)
    agent_counters: dict[str, int] = {}
    for w in pool:
        for k, v in w.expect(STOPPED, 60.0).items():
            agent_counters[k] = agent_counters.get(k, 0) + v
    rec["agent_counters"] = agent_counters


def measure(n: int, opts: ScaleOptions, report: Callable[[str], None] = print) -> dict[str, Any]:
    """Provision and run one federation of ``n`` agents; the coordinator's record plus the
    workers' counters. A phase that fails is recorded in ``error``, never raised."""
    rec: dict[str, Any] = {"agents": n, "workers": math.ceil(n / opts.agents_per_worker)}
    with tempfile.TemporaryDirectory(prefix=f"takfl-agents-scale-{n}-") as tmp:
        work = Path(tmp)
        cfg_path = work / "federation.yaml"
        cfg_path.write_text(
            yaml.safe_dump(
                federation_config(n, opts.rounds, opts.width, opts.privacy), sort_keys=False
            )
        )
        try:
            cfg = load_federation(cfg_path)
        except ConfigError as e:
            rec["error"] = f"no valid federation of {n} clients: {e}"
            return summarise(rec)
        t = time.perf_counter()
        records, files, password = provision(
            cfg,
            work / "fed",
            fleet=FLEET,
            mosquitto_port=free_port(),
            mosquitto_user=getpass.getuser(),
        )
        rec["provision_s"] = time.perf_counter() - t
        if files is None:
            rec["error"] = "provision wrote no Mosquitto configuration"
            return summarise(rec)
        coordinator_spec = {
            "config": str(cfg_path),
            "agents_file": str(work / "fed" / REGISTRY_FILE),
            "coordinator_password": password,
            "seed": opts.seed,
            "rounds": opts.rounds,
            "round_timeout_s": opts.round_timeout_s,
            "tracemalloc": opts.tracemalloc,
            "restart": opts.restart,
            "register_timeout_s": opts.register_timeout_s,
            "run_dir": str(work / "run"),
        }
        agents = agent_specs(records, opts.drop_fraction)
        status_spec = {
            "url": f"mqtt://{MONITOR_USER}@{files.host}:{files.service_port}",
            "password_file": str(work / "fed" / "monitor.password"),
        }
        broker = MosquittoProcess(files)
        children: list[Child] = []
        try:
            broker.start()
            coordinator, pool = start_children(
                work, files, coordinator_spec, agents, opts, children
            )
            rec["load_before"] = list(os.getloadavg())
            drive(rec, coordinator, pool, opts, report, status_spec)
            rec["load_after"] = list(os.getloadavg())
        except (BenchError, BrokerStartError) as e:
            rec["error"] = str(e)
        finally:
            for c in children:
                c.stop()
            broker.stop()
            rec["broker_dropped"] = broker_drops(files.log)
    return summarise(rec)


def broker_drops(log_file: Path) -> int:
    """Messages Mosquitto says it dropped (a client's queue full), from its log."""
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return 0
    return sum(1 for line in text.splitlines() if "dropped" in line.lower())


def time_status(spec: dict[str, str], timeout_s: float = 60.0) -> dict[str, Any]:
    """``takfl-coordinator status --broker`` as an operator runs it: seconds until it
    exits, its exit code and the agents its table lists."""
    cmd = [
        sys.executable,
        "-m",
        "coordinator.cli",
        "status",
        "--broker",
        spec["url"],
        "--password-file",
        spec["password_file"],
        "--fleet",
        FLEET,
    ]
    env = os.environ | {"COLUMNS": "200", "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"status_s": None, "status_error": f"no answer within {timeout_s:g} s"}
    took = time.perf_counter() - t
    lines = out.stdout.splitlines()
    listed = sum(1 for line in lines if " online " in line and "prototype" not in line)
    rec: dict[str, Any] = {"status_s": took, "status_rc": out.returncode, "status_online": listed}
    if out.returncode != 0:
        rec["status_error"] = out.stderr[-500:]
    return rec


def environment() -> dict[str, Any]:
    import paho.mqtt

    mosquitto = find_mosquitto()
    version = "not installed"
    if mosquitto is not None:
        out = subprocess.run([mosquitto, "-h"], capture_output=True, text=True, timeout=10)
        version = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "?"
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "paho_mqtt": paho.mqtt.__version__,
        "mosquitto": version,
    }


def run(
    agents: list[int],
    opts: ScaleOptions,
    output: Path | None = RESULTS,
    command: str = "",
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every N in ``agents``; the JSON record (also written to ``output``)."""
    load_at_start = list(os.getloadavg())
    results = []
    for n in agents:
        report(f"N = {n}: {math.ceil(n / opts.agents_per_worker)} worker process(es)")
        t = time.perf_counter()
        rec = measure(n, opts, report)
        rec["benchmark_s"] = time.perf_counter() - t
        results.append(rec)
        if "error" in rec:
            report(f"N = {n} failed: {rec['error']}")
    record = {
        "command": command,
        "environment": environment() | {"load_average_at_start": load_at_start},
        "options": asdict(opts),
        "federation": DATA_NOTE,
        "results": results,
        "memory_slopes": slopes(results),
        "goals": goals(results),
    }
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(record, indent=2) + "\n")
    return record


def print_record(console: Console, record: dict[str, Any], opts: ScaleOptions) -> None:
    """The machine, the federation, the tables and each N's recovery notes and errors."""
    env = record["environment"]
    console.print(
        f"machine: {env['cpus']} cores, {env['memory_gib']} GiB, {env['platform']}; "
        f"python {env['python']}, torch {env['torch']}, paho-mqtt {env['paho_mqtt']}, "
        f"{env['mosquitto']}"
    )
    console.print(f"federation: {DATA_NOTE}")
    params = next((r["parameters"] for r in record["results"] if "parameters" in r), None)
    console.print(f"model: {BUILDER} width {opts.width}, {cell(params, 'd')} parameters")
    console.print(results_table(record))
    console.print(slope_table(record))
    for name, g in record["goals"].items():
        console.print(f"goal {name}: {g}")
    for r in record["results"]:
        if notes := recovery_notes(r):
            console.print(f"N = {r['agents']}, timed rounds: {notes}")
        if "error" in r:
            console.print(f"N = {r['agents']} failed: {r['error']}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", default="100,500,1000,2000,5000", help="comma-separated N values")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--agents-per-worker", type=int, default=1000)
    ap.add_argument("--register-timeout", type=float, default=180.0)
    ap.add_argument("--round-timeout", type=float, default=120.0)
    ap.add_argument("--no-tracemalloc", action="store_true")
    ap.add_argument("--width", type=int, default=8, help="mlp_digits width (8: 610 parameters)")
    ap.add_argument("--output", type=Path, default=RESULTS)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--coordinator", type=Path, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    if args.coordinator is not None:
        return coordinator_main(args.coordinator)
    try:
        agents = [int(a) for a in args.agents.split(",") if a.strip()]
    except ValueError:
        ap.error(f"--agents takes comma-separated integers, got {args.agents!r}")
    if min([*agents, args.rounds, args.agents_per_worker, args.width, 0 if not agents else 1]) < 1:
        ap.error("--agents, --rounds, --agents-per-worker and --width must be positive")
    if find_mosquitto() is None:
        ap.error("mosquitto not found: install it (apt install mosquitto)")
    exit_on_sigterm()
    opts = ScaleOptions(
        rounds=args.rounds,
        agents_per_worker=args.agents_per_worker,
        register_timeout_s=args.register_timeout,
        round_timeout_s=args.round_timeout,
        tracemalloc=not args.no_tracemalloc,
        width=args.width,
    )
    console = Console(width=200)
    command = "python " + shlex.join(sys.argv if argv is None else [sys.argv[0], *argv])
    console.print(f"$ {command}")
    record = run(agents, opts, args.output, command, console.print)
    print_record(console, record, opts)
    console.print(f"wrote {args.output}")
    return 0 if all(r["status"] == "ok" for r in record["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
