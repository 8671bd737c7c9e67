"""The coordinator against N light agents on one Mosquitto: registration, round overhead, memory.

    python benchmarks/agents_scale.py [--agents 10,100,500] [--rounds 3] [--agents-per-worker 100]

For every N, a fresh federation is provisioned (``coordinator.serve.provision``: agent
registry, per-agent secrets, Mosquitto password file and ACL) and one Mosquitto is
started. The coordinator side (``MqttTransport`` + ``RoundEngine``, algorithm ``fedavg``
so no distillation is timed) runs in its own process; the N agents are real
``AgentLink`` clients (one MQTT connection each, username = agent id), up to
``--agents-per-worker`` of them in each worker process, all served from one loop.

The federation: one prototype ``S`` (profile ``android-phone``: int8 update
compression, 128 KiB chunks) of N clients, sample rate 1.0 (every agent gets a task
every round), model ``mlp_digits`` with width 8 (610 parameters; ``--width``), the
digits data set with the demo federation's test/validation/public sizes (360/100/400)
and ``partition.min_per_client: 1``, so the 937 private samples give each of up to 937
clients a real shard (a larger N is refused by the partition and reported as such).
Agents do not train: each announces the size of its shard and answers a task at once
with the global state plus a deterministic perturbation of 1e-3 * sin(...) on every
floating tensor, so the update is a valid, non-zero delta.

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

Prints the command line, the machine and a table; writes benchmarks/results/agents_scale.json.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import itertools
import json
import math
import os
import platform
import queue
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from coordinator.broker import BrokerStartError, MosquittoProcess, find_mosquitto, free_port
from coordinator.engine import RoundEngine, RoundPolicy
from coordinator.inputs import prototype_models, server_data
from coordinator.registry import REGISTRY_FILE, load_registry
from coordinator.serve import COORDINATOR_USER, provision, transport_policy, wire_registry
from coordinator.transport.base import ClientUpdate
from coordinator.transport.mqtt import GLOBAL_ENCODING, MqttTransport
from edge_agent.link import AgentIdentity, AgentLink, ReceivedTask
from takfl.algorithms import resolve_algorithm
from takfl.config import ConfigError, load_federation, load_profile
from takfl.data import PartitionError
from takfl.federation_data import build_federation_data
from takfl.mqtt.client import MqttSettings
from takfl.mqtt.credentials import mqtt_password
from takfl.wire.codec import encode_state

RESULTS = Path(__file__).resolve().parent / "results" / "agents_scale.json"
FLEET = "scale"
PROTOTYPE, PROFILE = "S", "android-phone"
BUILDER = "mlp_digits"
DATA = {"dataset": "digits", "test_size": 360, "validation_size": 100, "public_size": 400}
PERTURBATION = 1e-3
TOP_SITES = 6  # allocation sites listed after the traced registration
MB = 1e6
DATA_NOTE = (
    "one prototype S (android-phone: int8 deltas, 128 KiB chunks), N clients, sample rate "
    "1.0, mlp_digits (width in options); digits test/validation/public 360/100/400, the 937 "
    "private samples split by Dirichlet(0.3) with min_per_client 1; agents announce their "
    "real shard size but do not train: each answers with the global state + 1e-3*sin(...) "
    "on every float tensor"
)
# control lines between the orchestrator and its child processes (stdin/stdout)
READY = "ready"  # child: set up, waiting for GO
GO = "go"  # orchestrator: start (coordinator: connect and time; worker: connect agents)
STARTED = "started"  # child: connected
STOP = "stop"  # orchestrator to a worker: close the agents
DONE = "done"  # coordinator: the record follows
STOPPED = "stopped"  # worker: the agents' counters follow
PROGRESS = "progress"  # coordinator: a line for the console


class BenchError(RuntimeError):
    """A phase of the benchmark did not complete; the message says which and why."""


@dataclass(frozen=True)
class ScaleOptions:
    rounds: int = 3  # timed rounds per N
    agents_per_worker: int = 100  # AgentLinks served by one worker process
    register_timeout_s: float = 180.0  # all N agents registered and online within this
    round_timeout_s: float = 120.0  # a round closes at this deadline with whoever answered
    startup_timeout_s: float = 180.0  # child processes imported and ready
    tracemalloc: bool = True  # trace Python allocations in the coordinator process
    width: int = 8  # hidden width of mlp_digits: 8 gives 610 parameters
    seed: int = 0


# -- configuration -----------------------------------------------------------------------------
def federation_config(n: int, rounds: int, width: int = 8) -> dict[str, Any]:
    """A valid federation of one prototype with ``n`` clients (see the module docstring)."""
    return {
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


def peak_rss_mb() -> float:
    """Peak resident set of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak * 1024 / MB


# -- child processes: control over stdin/stdout --------------------------------------------------
def say(word: str, payload: Any = None) -> None:
    """One control line to the orchestrator: ``word`` and optional JSON."""
    sys.stdout.write(word + ("" if payload is None else " " + json.dumps(payload)) + "\n")
    sys.stdout.flush()


def read_commands(stream: IO[str]) -> queue.Queue[str]:
    """Lines of ``stream`` in a queue, ``"eof"`` last (the orchestrator went away)."""
    commands: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            commands.put(line.strip())
        commands.put("eof")

    threading.Thread(target=pump, name="commands", daemon=True).start()
    return commands


def await_command(commands: queue.Queue[str], word: str, timeout: float) -> None:
    try:
        got = commands.get(timeout=timeout)
    except queue.Empty:
        raise BenchError(f"no {word!r} from the orchestrator within {timeout:g} s") from None
    if got != word:
        raise BenchError(f"expected {word!r} from the orchestrator, got {got!r}")


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit so ``finally`` blocks close links and transports."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def worker_main(spec_path: Path) -> int:
    """Serve a share of the agents: connect on ``go``, answer every task at once, stop on
    ``stop`` (or when the orchestrator's pipe closes); report link counters."""
    exit_on_sigterm()
    torch.set_num_threads(1)
    spec = json.loads(spec_path.read_text())
    commands = read_commands(sys.stdin)
    links: list[tuple[int, AgentLink, int]] = []  # (agent index, link, num_samples)
    for a in spec["agents"]:
        secret = bytes.fromhex(a["secret_hex"])
        settings = MqttSettings(
            host=spec["host"],
            port=spec["port"],
            username=a["agent_id"],
            password=mqtt_password(secret),
        )
        identity = AgentIdentity(
            a["agent_id"],
            a["prototype"],
            secret,
            a["profile"],
            a["hardware_class"],
            a["num_samples"],
        )
        links.append((a["index"], AgentLink(settings, spec["fleet"], identity), a["num_samples"]))
    answered = 0
    say(READY)
    try:
        await_command(commands, GO, spec["startup_timeout_s"])
        t0 = time.perf_counter()
        for _, link, _ in links:
            link.start(timeout=None)
        end = t0 + spec["connect_timeout_s"]
        ready = sum(
            link.client.wait_ready(max(0.0, end - time.perf_counter())) for _, link, _ in links
        )
        say(STARTED, {"connected": ready, "connect_s": time.perf_counter() - t0})
        while True:
            with contextlib.suppress(queue.Empty):
                if commands.get_nowait() in (STOP, "eof"):
                    break
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
    finally:
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda item: item[1].close(), links))
    counters: dict[str, int] = {"answered": answered}
    for _, link, _ in links:
        for k, v in asdict(link.counters).items():
            counters[k] = counters.get(k, 0) + v
        for k in ("dropped", "publish_refused", "disconnects", "handler_errors"):
            counters[f"mqtt_{k}"] = counters.get(f"mqtt_{k}", 0) + getattr(link.client.counters, k)
    say(STOPPED, counters)
    return 0


def coordinator_main(spec_path: Path) -> int:
    """The coordinator side of one N: set up, time registration on ``go``, run the timed
    rounds, time a transport restart, then (untimed) trace Python allocations through
    another restart and one more round; say ``done`` with the record."""
    exit_on_sigterm()
    torch.set_num_threads(1)
    spec = json.loads(spec_path.read_text())
    commands = read_commands(sys.stdin)
    cfg = load_federation(spec["config"])
    registry = wire_registry(load_registry(Path(spec["agents_file"])))
    data = build_federation_data(cfg, spec["seed"])
    settings = MqttSettings(
        host=spec["host"],
        port=spec["port"],
        username=COORDINATOR_USER,
        password=spec["coordinator_password"],
    )
    ids = sorted(registry)
    timeout = spec["register_timeout_s"]
    upload_bytes: list[float] = []

    def on_update(upd: ClientUpdate) -> None:
        upload_bytes.append(upd.metrics.get("upload_bytes", 0.0))

    def transport() -> MqttTransport:
        return MqttTransport(
            settings,
            spec["fleet"],
            registry,
            num_classes=data.num_classes,
            input_shape=data.input_shape,
            policy=transport_policy(cfg),
        )

    def restart() -> tuple[MqttTransport, float, int]:
        """Close the engine's transport, start a new one (same client id and session) and
        wait for every agent: (transport, seconds, agents seen)."""
        engine.transport.close()
        t = time.perf_counter()
        link = engine.transport = transport().start(timeout=30)
        back = link.wait_for_agents(ids, timeout)
        seen = sum(len(v) for v in link.clients().values())
        if not back:
            raise BenchError(
                f"after a coordinator restart only {seen} of {len(ids)} agents "
                f"were seen within {timeout:g} s"
            )
        return link, time.perf_counter() - t, seen

    def counters(link: MqttTransport) -> dict[str, Any]:
        return asdict(link.counters) | {
            f"mqtt_{k}": getattr(link.client.counters, k)
            for k in ("dropped", "publish_refused", "disconnects", "handler_errors")
        }

    first = transport()
    engine = RoundEngine(
        cfg,
        prototype_models(cfg),
        server_data(data, torch.device("cpu")),
        first,
        algorithm=resolve_algorithm(cfg.algorithm, "fedavg"),
        device="cpu",
        seed=spec["seed"],
        on_update=on_update,
        policy=RoundPolicy(deadline_s=spec["round_timeout_s"], quorum=1.0, max_wait_s=0.0),
    )
    absorbing = [0.0]  # seconds in RoundEngine.absorb this round (FedAvg fold + logits)
    absorb = engine.absorb

    def timed_absorb(upd: ClientUpdate, collector: Any) -> bool:
        t = time.perf_counter()
        taken = absorb(upd, collector)
        absorbing[0] += time.perf_counter() - t
        return taken

    engine.absorb = timed_absorb  # type: ignore[method-assign,assignment]
    rec: dict[str, Any] = {"rss_setup_mb": peak_rss_mb()}
    say(READY)
    try:
        await_command(commands, GO, spec["startup_timeout_s"])
        t0 = time.perf_counter()
        first.start(timeout=30)
        rec["coordinator_start_s"] = time.perf_counter() - t0
        say(STARTED)
        all_in = first.wait_for_agents(ids, timeout)
        rec["register_s"] = time.perf_counter() - t0
        rec["registered"] = sum(len(v) for v in first.clients().values())
        say(PROGRESS, f"{rec['registered']}/{len(ids)} registered in {rec['register_s']:.2f} s")
        if not all_in:
            raise BenchError(
                f"only {rec['registered']} of {len(ids)} agents registered and "
                f"online within {timeout:g} s"
            )
        rec["rounds"] = []
        for r in range(spec["rounds"]):
            absorbing[0] = 0.0
            t, cpu = time.perf_counter(), time.process_time()
            res = engine.run_round(r)
            wall = time.perf_counter() - t
            row = {
                "round": r,
                "wall_s": wall,
                "cpu_s": time.process_time() - cpu,  # all threads of the coordinator process
                "absorb_s": absorbing[0],
                "received": res.received.get(PROTOTYPE, 0),
                "sampled": res.sampled.get(PROTOTYPE, 0),
                "timings": res.timings,
            }
            rec["rounds"].append(row)
            say(PROGRESS, f"round {r}: {row['received']}/{row['sampled']} updates in {wall:.2f} s")
        rec["rss_peak_mb"] = peak_rss_mb()
        state = engine.globals[PROTOTYPE]
        rec["parameters"] = sum(v.numel() for v in state.values() if v.is_floating_point())
        rec["global_blob_bytes"] = len(encode_state(state, GLOBAL_ENCODING))
        rec["update_blob_bytes"] = max(upload_bytes, default=0.0)
        rec["transport"] = counters(first)
        link, rec["reregister_s"], rec["reregistered"] = restart()
        rec["reregister_transport"] = counters(link)
        say(PROGRESS, f"restarted transport saw all agents in {rec['reregister_s']:.2f} s")
        if spec["tracemalloc"]:
            tracemalloc.start()
            link, _, _ = restart()
            rec["tracemalloc_registered_mb"] = tracemalloc.get_traced_memory()[0] / MB
            top = tracemalloc.take_snapshot().statistics("lineno")[:TOP_SITES]
            rec["tracemalloc_registered_top"] = [
                {"site": str(st.traceback), "kb": st.size / 1000, "blocks": st.count} for st in top
            ]
            res = engine.run_round(spec["rounds"])
            rec["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / MB
            rec["tracemalloc_round_received"] = res.received.get(PROTOTYPE, 0)
            tracemalloc.stop()
    except BenchError as e:
        rec["error"] = str(e)
    finally:
        engine.transport.close()
    say(DONE, rec)
    return 0


class Child:
    """This script in another mode as a child process, driven by control lines."""

    def __init__(self, name: str, mode: str, spec: dict[str, Any], work: Path) -> None:
        self.name = name
        spec_path = work / f"{name}.json"
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
        self.log = work / f"{name}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), mode, str(spec_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        if self.proc.stdout is None:
            raise BenchError(f"{name}: no pipe to its standard output")
        self.lines = read_commands(self.proc.stdout)

    def send(self, word: str) -> None:
        if self.proc.stdin is None:
            return
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()

    def expect(
        self, word: str, timeout: float, progress: Callable[[str], None] | None = None
    ) -> Any:
        """The JSON after the next ``word`` line; BenchError on timeout or exit."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no {word!r} within {timeout:g} s{self.tail()}")
            try:
                line = self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line == "eof":
                code = self.proc.wait(10)
                raise BenchError(f"{self.name} exited ({code}) before {word!r}{self.tail()}")
            head, _, rest = line.partition(" ")
            if head == PROGRESS and progress is not None:
                progress(f"{self.name}: {json.loads(rest)}")
            elif head == word:
                return json.loads(rest) if rest else None

    def tail(self, chars: int = 1500) -> str:
        try:
            text = self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
        return f"; log tail:\n{text}" if text.strip() else ""

    def stop(self, timeout: float = 30.0) -> None:
        """Close its stdin (it stops on its own), then SIGTERM, then SIGKILL."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        for action in (None, self.proc.terminate, self.proc.kill):
            if action is not None:
                action()
            try:
                self.proc.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                continue


# -- orchestration -----------------------------------------------------------------------------
def measure(n: int, opts: ScaleOptions, report: Callable[[str], None] = print) -> dict[str, Any]:
    """Provision and run one federation of ``n`` agents; the coordinator's record plus the
    workers' counters. A phase that fails is recorded in ``error``, never raised."""
    workers = math.ceil(n / opts.agents_per_worker)
    rec: dict[str, Any] = {"agents": n, "workers": workers}
    with tempfile.TemporaryDirectory(prefix=f"takfl-agents-scale-{n}-") as tmp:
        work = Path(tmp)
        cfg_path = work / "federation.yaml"
        cfg_path.write_text(
            yaml.safe_dump(federation_config(n, opts.rounds, opts.width), sort_keys=False)
        )
        try:
            cfg = load_federation(cfg_path)
            data = build_federation_data(cfg, opts.seed)
        except (ConfigError, PartitionError) as e:
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
        shard = {cid: len(x) for cid, (_, x, _) in data.clients.items()}
        hardware = load_profile(PROFILE).hardware_class
        agents = [
            {
                "index": i,
                "agent_id": r.agent_id,
                "prototype": r.prototype,
                "profile": r.profile,
                "secret_hex": r.secret_hex,
                "hardware_class": hardware,
                "num_samples": shard[r.agent_id],
            }
            for i, r in enumerate(records)
        ]
        common = {
            "host": files.host,
            "port": files.port,
            "fleet": FLEET,
            "startup_timeout_s": opts.startup_timeout_s,
        }
        broker = MosquittoProcess(files)
        children: list[Child] = []
        try:
            broker.start()
            coordinator = Child(
                "coordinator",
                "--coordinator",
                common
                | {
                    "config": str(cfg_path),
                    "agents_file": str(work / "fed" / REGISTRY_FILE),
                    "coordinator_password": password,
                    "seed": opts.seed,
                    "rounds": opts.rounds,
                    "round_timeout_s": opts.round_timeout_s,
                    "tracemalloc": opts.tracemalloc,
                    "register_timeout_s": opts.register_timeout_s,
                },
                work,
            )
            children.append(coordinator)
            share = math.ceil(n / workers)
            pool = [
                Child(
                    f"worker-{w}",
                    "--worker",
                    common
                    | {
                        "agents": agents[w * share : (w + 1) * share],
                        "connect_timeout_s": opts.register_timeout_s,
                    },
                    work,
                )
                for w in range(workers)
            ]
            children += pool
            for c in children:
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
            for w in pool:
                w.send(STOP)
            agent_counters: dict[str, int] = {}
            for w in pool:
                for k, v in w.expect(STOPPED, 60.0).items():
                    agent_counters[k] = agent_counters.get(k, 0) + v
            rec["agent_counters"] = agent_counters
        except (BenchError, BrokerStartError) as e:
            rec["error"] = str(e)
        finally:
            for c in children:
                c.stop()
            broker.stop()
    return summarise(rec)


def summarise(rec: dict[str, Any]) -> dict[str, Any]:
    """Medians over the rounds, per agent; memory above setup; status ok/partial/failed."""
    rounds = rec.get("rounds") or []
    n = rec["agents"]
    if rounds:
        rec["round_s_median"] = statistics.median(r["wall_s"] for r in rounds)
        rec["per_agent_ms"] = rec["round_s_median"] / n * 1000
        rec["cpu_ms_per_agent"] = statistics.median(r["cpu_s"] for r in rounds) / n * 1000
        rec["absorb_ms_per_agent"] = statistics.median(r["absorb_s"] for r in rounds) / n * 1000
    if "rss_peak_mb" in rec:
        rec["rss_growth_mb"] = rec["rss_peak_mb"] - rec["rss_setup_mb"]
    complete = len(rounds) > 0 and all(r["received"] == r["sampled"] == n for r in rounds)
    rec["status"] = "failed" if "error" in rec else "ok" if complete else "partial"
    return rec


def slopes(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Memory per extra agent between consecutive N values that both got that far."""
    out = []
    for a, b in itertools.pairwise([r for r in results if "rss_peak_mb" in r]):
        extra = b["agents"] - a["agents"]
        row = {"from": a["agents"], "to": b["agents"]}
        for key, per_agent, scale in (
            ("rss_peak_mb", "rss_mb_per_agent", 1.0),
            ("tracemalloc_registered_mb", "traced_held_kb_per_agent", 1000.0),
            ("tracemalloc_peak_mb", "traced_peak_kb_per_agent", 1000.0),
        ):
            if key in a and key in b:
                row[per_agent] = (b[key] - a[key]) * scale / extra
        row["global_blob_bytes"] = b.get("global_blob_bytes")
        row["update_blob_bytes"] = b.get("update_blob_bytes")
        out.append(row)
    return out


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
        "environment": environment(),
        "options": asdict(opts),
        "federation": DATA_NOTE,
        "results": results,
        "memory_slopes": slopes(results),
    }
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(record, indent=2) + "\n")
    return record


# -- presentation ------------------------------------------------------------------------------
def _f(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def results_table(record: dict[str, Any]) -> Table:
    t = Table(title="Coordinator vs N agents on one Mosquitto (fedavg, agents answer at once)")
    columns = {
        "agents": ("agents", "d"),
        "workers": ("workers", "d"),
        "registered": ("registered", "d"),
        "register s": ("register_s", ".2f"),
        "restart s": ("reregister_s", ".2f"),
        "round s (median)": ("round_s_median", ".3f"),
        "ms/agent": ("per_agent_ms", ".2f"),
        "CPU ms/agent": ("cpu_ms_per_agent", ".2f"),
        "absorb ms/agent": ("absorb_ms_per_agent", ".2f"),
        "RSS setup MB": ("rss_setup_mb", ".1f"),
        "RSS peak MB": ("rss_peak_mb", ".1f"),
        "traced MB held/peak": ("", ""),
        "updates": ("", ""),
        "status": ("status", "s"),
    }
    for col in columns:
        t.add_column(col, justify="left" if col in ("updates", "status") else "right")
    for r in record["results"]:
        counts = [f"{x['received']}/{x['sampled']}" for x in r.get("rounds") or []]
        updates = f"{counts[0]} x{len(counts)}" if len(set(counts)) == 1 else ", ".join(counts)
        traced = f"{_f(r.get('tracemalloc_registered_mb'), '.2f')} / "
        traced += _f(r.get("tracemalloc_peak_mb"), ".2f")
        cells = [_f(r.get(key), fmt) for key, fmt in columns.values() if key]
        t.add_row(*cells[:-1], traced, updates or "-", cells[-1])
    return t


def recovery_notes(rec: dict[str, Any]) -> str:
    """Non-zero loss and recovery counters of one N (empty when the rounds ran clean)."""
    coordinator = rec.get("transport") or {}
    agents = rec.get("agent_counters") or {}
    items = [
        ("coordinator inbox dropped", coordinator.get("mqtt_dropped")),
        ("coordinator publishes refused", coordinator.get("mqtt_publish_refused")),
        ("chunk re-requests by the coordinator", coordinator.get("chunk_requests_sent")),
        ("tasks sent again", coordinator.get("task_retries")),
        ("updates refused", sum((coordinator.get("refused") or {}).values())),
        ("agent inboxes dropped", agents.get("mqtt_dropped")),
        ("update headers re-announced", agents.get("header_retries")),
    ]
    return ", ".join(f"{label} {v}" for label, v in items if v)


def slope_table(record: dict[str, Any]) -> Table:
    t = Table(title="Coordinator memory per extra agent, next to the model blobs")
    columns = {
        "between N": ("", ""),
        "RSS peak MB / agent": ("rss_mb_per_agent", ".4f"),
        "traced held KB / agent": ("traced_held_kb_per_agent", ".2f"),
        "traced peak KB / agent": ("traced_peak_kb_per_agent", ".2f"),
        "global blob bytes": ("global_blob_bytes", "d"),
        "update blob bytes": ("update_blob_bytes", ".0f"),
    }
    for col in columns:
        t.add_column(col, justify="right")
    for s in record["memory_slopes"]:
        cells = [_f(s.get(key), fmt) for key, fmt in columns.values() if key]
        t.add_row(f"{s['from']} -> {s['to']}", *cells)
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", default="10,100,500", help="comma-separated N values")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--agents-per-worker", type=int, default=100)
    ap.add_argument("--register-timeout", type=float, default=180.0)
    ap.add_argument("--round-timeout", type=float, default=120.0)
    ap.add_argument("--no-tracemalloc", action="store_true")
    ap.add_argument("--width", type=int, default=8, help="mlp_digits width (8: 610 parameters)")
    ap.add_argument("--output", type=Path, default=RESULTS)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--coordinator", type=Path, help=argparse.SUPPRESS)
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
    env = record["environment"]
    console.print(
        f"machine: {env['cpus']} cores, {env['memory_gib']} GiB, {env['platform']}; "
        f"python {env['python']}, torch {env['torch']}, paho-mqtt {env['paho_mqtt']}, "
        f"{env['mosquitto']}"
    )
    console.print(f"federation: {DATA_NOTE}")
    params = next((r["parameters"] for r in record["results"] if "parameters" in r), None)
    console.print(f"model: {BUILDER} width {opts.width}, {_f(params, 'd')} parameters")
    console.print(results_table(record))
    console.print(slope_table(record))
    for r in record["results"]:
        if notes := recovery_notes(r):
            console.print(f"N = {r['agents']}, timed rounds: {notes}")
        if "error" in r:
            console.print(f"N = {r['agents']} failed: {r['error']}")
    console.print(f"wrote {args.output}")
    return 0 if all(r["status"] == "ok" for r in record["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
