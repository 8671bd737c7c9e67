"""The coordinator side of one N: ``MqttTransport`` + ``RoundEngine`` (algorithm ``fedavg``,
so no distillation is timed) in a process of its own.

On ``go`` it times the registration of every agent, runs the timed rounds, times a
restarted transport seeing every agent again, then (untimed) traces Python allocations
through another restart and one more round, and says ``done`` with the record.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import tracemalloc
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.fleet.control import (
    DONE,
    GO,
    PROGRESS,
    READY,
    STARTED,
    BenchError,
    await_command,
    exit_on_sigterm,
    read_commands,
    say,
)
from coordinator.engine import RoundEngine, RoundPolicy
from coordinator.inputs import prototype_models, server_data
from coordinator.registry import load_registry
from coordinator.serve import COORDINATOR_USER, transport_policy, wire_registry
from coordinator.store import RunStore
from coordinator.telemetry_log import TelemetryRecorder, TelemetryWriter
from coordinator.transport.base import ClientUpdate
from coordinator.transport.mqtt import GLOBAL_ENCODING, MqttTransport
from takfl.algorithms import resolve_algorithm
from takfl.config import FederationConfig, load_federation
from takfl.federation_data import build_federation_data
from takfl.mqtt.client import MqttSettings
from takfl.run_layout import TELEMETRY_FILE
from takfl.wire.codec import encode_state

TOP_SITES = 6  # allocation sites listed after the traced registration
MB = 1e6
MQTT_COUNTERS = ("dropped", "publish_refused", "disconnects", "handler_errors", "inbox_waits")


def peak_rss_mb() -> float:
    """Peak resident set of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak * 1024 / MB


def server_only(cfg: FederationConfig) -> FederationConfig:
    """``cfg`` with one client per prototype: what the coordinator's server data (test,
    validation, public) need, whatever the number of agents (their shards are synthetic)."""
    prototypes = [p.model_copy(update={"clients": 1}) for p in cfg.prototypes]
    return cfg.model_copy(update={"prototypes": prototypes})


class CountingRecorder(TelemetryRecorder):
    """The run's telemetry recorder, counting records and the seconds its callers spent
    handing them over (with a writer: the transport's dispatcher thread's cost)."""

    records = 0
    seconds = 0.0

    def _write(self, kind: str, **fields: Any) -> None:
        t = time.perf_counter()
        super()._write(kind, **fields)
        self.seconds += time.perf_counter() - t
        self.records += 1


def counters(link: MqttTransport) -> dict[str, Any]:
    """The transport's counters and its MQTT client's (``mqtt_*``)."""
    return asdict(link.counters) | {
        f"mqtt_{k}": getattr(link.client.counters, k) for k in MQTT_COUNTERS
    }


class CoordinatorSide:
    """The engine of the spec's one-prototype federation over a transport to its broker,
    with the time spent in ``RoundEngine.absorb`` counted per round."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.cfg = load_federation(spec["config"])
        self.prototype = self.cfg.prototypes[0].name
        self.registry = wire_registry(load_registry(Path(spec["agents_file"])))
        self.data = build_federation_data(server_only(self.cfg), spec["seed"])
        self.store = RunStore(Path(spec["run_dir"]))
        self.writer = TelemetryWriter(self.store)  # as serve runs it
        self.recorder = CountingRecorder(self.store, writer=self.writer)
        self.settings = MqttSettings(
            host=spec["host"],
            port=spec["port"],
            username=COORDINATOR_USER,
            password=spec["coordinator_password"],
        )
        self.ids = sorted(self.registry)
        self.timeout = spec["register_timeout_s"]
        self.upload_bytes: list[float] = []
        self.first = self.transport()
        self.engine = RoundEngine(
            self.cfg,
            prototype_models(self.cfg),
            server_data(self.data, torch.device("cpu")),
            self.first,
            algorithm=resolve_algorithm(self.cfg.algorithm, "fedavg"),
            device="cpu",
            seed=spec["seed"],
            on_update=self.on_update,
            policy=RoundPolicy(deadline_s=spec["round_timeout_s"], quorum=1.0, max_wait_s=0.0),
        )
        self.absorbing = 0.0  # seconds in RoundEngine.absorb this round (FedAvg fold + logits)
        self._absorb = self.engine.absorb
        self.engine.absorb = self.timed_absorb  # type: ignore[method-assign,assignment]

    def transport(self) -> MqttTransport:
        return MqttTransport(
            self.settings,
            self.spec["fleet"],
            self.registry,
            num_classes=self.data.num_classes,
            input_shape=self.data.input_shape,
            policy=transport_policy(self.cfg),
            observer=self.recorder,
        )

    def on_update(self, upd: ClientUpdate) -> None:
        self.upload_bytes.append(upd.metrics.get("upload_bytes", 0.0))

    def timed_absorb(self, upd: ClientUpdate, collector: Any) -> bool:
        t = time.perf_counter()
        taken = self._absorb(upd, collector)
        self.absorbing += time.perf_counter() - t
        return taken

    def register(self, rec: dict[str, Any]) -> None:
        """Start the first transport (the agents are released once it is connected) and
        time until it sees every agent registered and online."""
        t0 = time.perf_counter()
        self.first.start(timeout=30)
        rec["coordinator_start_s"] = time.perf_counter() - t0
        say(STARTED)
        all_in = self.first.wait_for_agents(self.ids, self.timeout)
        rec["register_s"] = time.perf_counter() - t0
        rec["registered"] = sum(len(v) for v in self.first.clients().values())
        say(
            PROGRESS, f"{rec['registered']}/{len(self.ids)} registered in {rec['register_s']:.2f} s"
        )
        if not all_in:
            raise BenchError(
                f"only {rec['registered']} of {len(self.ids)} agents registered and "
                f"online within {self.timeout:g} s"
            )

    def timed_rounds(self, rec: dict[str, Any]) -> None:
        """The spec's rounds, each timed (wall, this process's CPU, absorb)."""
        rec["rounds"] = []
        for r in range(self.spec["rounds"]):
            self.absorbing = 0.0
            t, cpu = time.perf_counter(), time.process_time()
            res = self.engine.run_round(r)
            wall = time.perf_counter() - t
            row = {
                "round": r,
                "wall_s": wall,
                "cpu_s": time.process_time() - cpu,  # all threads of the coordinator process
                "absorb_s": self.absorbing,
                "received": res.received.get(self.prototype, 0),
                "sampled": res.sampled.get(self.prototype, 0),
                "timings": res.timings,
            }
            if res.kept_previous:
                row["kept_previous"] = res.kept_previous
            rec["rounds"].append(row)
            say(PROGRESS, f"round {r}: {row['received']}/{row['sampled']} updates in {wall:.2f} s")

    def model_figures(self, rec: dict[str, Any]) -> None:
        """Memory after the rounds, the model's size and blob sizes, transport counters."""
        rec["rss_peak_mb"] = peak_rss_mb()
        state = self.engine.globals[self.prototype]
        rec["parameters"] = sum(v.numel() for v in state.values() if v.is_floating_point())
        rec["global_blob_bytes"] = len(encode_state(state, GLOBAL_ENCODING))
        rec["update_blob_bytes"] = max(self.upload_bytes, default=0.0)
        rec["transport"] = counters(self.first)
        self.writer.flush()
        size = self.store.root.joinpath(TELEMETRY_FILE).stat().st_size
        rec["telemetry_batches"] = self.writer.batches
        records = max(1, self.recorder.records)
        rec["telemetry_records"] = self.recorder.records
        rec["telemetry_bytes_per_record"] = size / records
        rec["telemetry_ms_per_record"] = self.recorder.seconds * 1000 / records

    def restart(self) -> tuple[MqttTransport, float, int]:
        """Close the engine's transport, start a new one (same client id and session) and
        wait for every agent: (transport, seconds, agents seen)."""
        self.engine.transport.close()
        t = time.perf_counter()
        link = self.engine.transport = self.transport().start(timeout=30)
        back = link.wait_for_agents(self.ids, self.timeout)
        seen = sum(len(v) for v in link.clients().values())
        if not back:
            raise BenchError(
                f"after a coordinator restart only {seen} of {len(self.ids)} agents "
                f"were seen within {self.timeout:g} s"
            )
        return link, time.perf_counter() - t, seen

    def timed_restart(self, rec: dict[str, Any]) -> None:
        link, rec["reregister_s"], rec["reregistered"] = self.restart()
        rec["reregister_transport"] = counters(link)
        say(PROGRESS, f"restarted transport saw all agents in {rec['reregister_s']:.2f} s")

    def traced_pass(self, rec: dict[str, Any]) -> None:
        """Untimed: Python memory held after another restart takes in every registration
        (with its largest allocation sites), and the peak over one more round."""
        tracemalloc.start()
        self.restart()
        rec["tracemalloc_registered_mb"] = tracemalloc.get_traced_memory()[0] / MB
        top = tracemalloc.take_snapshot().statistics("lineno")[:TOP_SITES]
        rec["tracemalloc_registered_top"] = [
            {"site": str(st.traceback), "kb": st.size / 1000, "blocks": st.count} for st in top
        ]
        res = self.engine.run_round(self.spec["rounds"])
        rec["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / MB
        rec["tracemalloc_round_received"] = res.received.get(self.prototype, 0)
        tracemalloc.stop()


def coordinator_main(spec_path: Path) -> int:
    """The coordinator side of one N: set up, time registration on ``go``, run the timed
    rounds, time a transport restart, then (untimed) trace Python allocations through
    another restart and one more round; say ``done`` with the record."""
    exit_on_sigterm()
    torch.set_num_threads(1)
    spec = json.loads(spec_path.read_text())
    commands = read_commands(sys.stdin)
    side = CoordinatorSide(spec)
    rec: dict[str, Any] = {"rss_setup_mb": peak_rss_mb()}
    say(READY)
    try:
        await_command(commands, GO, spec["startup_timeout_s"])
        side.register(rec)
        side.timed_rounds(rec)
        side.model_figures(rec)
        if spec.get("restart", True):
            side.timed_restart(rec)
        if spec["tracemalloc"]:
            side.traced_pass(rec)
    except BenchError as e:
        rec["error"] = str(e)
    finally:
        side.engine.transport.close()
    say(DONE, rec)
    return 0
