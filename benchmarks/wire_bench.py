"""Bytes on the wire per update and MQTT throughput on loopback.

    python benchmarks/wire_bench.py [--runs 5] [--blob-mib 5] [--skip-throughput]

1. Update size: for every bundled device profile's model and every model of the
   digits federation, the delta of a real local training step against the global
   model (``train_local``: one epoch, batch 16, the profile's optimiser and learning
   rate, on 32 samples: real digits images for the digits models, random images
   with random labels for the 32x32 profile models) is encoded with fp32, fp16 and
   int8. Bytes on the wire = blob + 44-byte chunk headers + the signed JSON update
   header + MQTT PUBLISH framing (fixed header, topic, packet id) of every message,
   with the profile's chunk size. Also the largest decoding error relative to the
   largest delta value.
2. Throughput: a random blob (default 5 MiB) in 128 KiB chunks from one client to
   another through each broker (embedded amqtt, Mosquitto if installed), QoS 1,
   reassembled and verified; and one full update (a ~5 MB fp32 model delta) from
   ``AgentLink`` to ``MqttTransport`` including validation and reconstruction.
   Median of ``--runs``; MB = 10^6 bytes.

Prints tables and writes benchmarks/results/wire.json.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import platform
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from coordinator.broker import EmbeddedBroker, MosquittoProcess, find_mosquitto, free_port
from coordinator.broker.acl import BrokerAccess
from coordinator.broker.mosquitto import write_mosquitto_config
from coordinator.transport.base import Task
from coordinator.transport.mqtt import MqttTransport, TransportPolicy
from edge_agent.link import AgentIdentity, AgentLink, LinkPolicy
from takfl.config import load_federation, load_profile, prototype_model
from takfl.config.base import ModelSpec
from takfl.config.loader import bundled_names
from takfl.config.profile import DeviceProfile
from takfl.data import load_digits
from takfl.models import build_model, count_parameters, get_entry
from takfl.mqtt.blobs import BlobReceiver
from takfl.mqtt.client import MqttClient, MqttSettings
from takfl.training import train_local
from takfl.wire.chunking import ReassemblyLimits, blob_ref, split
from takfl.wire.codec import decode_state, make_delta
from takfl.wire.messages import (
    CHUNK_HEADER_BYTES,
    BlobRef,
    Chunk,
    Compression,
    ModelRef,
    TaskMessage,
    decode_chunk,
    encode_chunk,
    encode_message,
)
from takfl.wire.signing import generate_secret
from takfl.wire.topics import Topics, Up
from takfl.wire.update import prepare_update
from takfl.wire.validation import AgentRecord

RESULTS = Path(__file__).resolve().parent / "results" / "wire.json"
FLEET = "bench"
AGENT = "agent-0001"
SAMPLES = 32
MODES: tuple[Compression, ...] = ("fp32", "fp16", "int8")
DELTA_KIND = (
    "delta after one local epoch of train_local (batch 16, profile optimiser/lr) on 32 "
    "samples: real digits images for digits models, random 32x32 images and labels otherwise"
)


def mqtt_publish_bytes(topic: str, payload_len: int, qos: int = 1) -> int:
    """Size of an MQTT 3.1.1 PUBLISH: fixed header, remaining length, topic, packet id."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + payload_len
    varint = 1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2**21 else 4
    return 1 + varint + remaining


# -- 1. bytes per update ------------------------------------------------------------------------
def model_cases() -> list[tuple[str, str, DeviceProfile, ModelSpec, str]]:
    """(label, source, profile, model, data): bundled profiles, then digits prototypes."""
    cases = []
    for name in bundled_names("devices"):
        prof = load_profile(name)
        cases.append((f"{prof.model.builder} ({name})", "profile", prof, prof.model, "random"))
    cfg = load_federation("digits")
    for proto in cfg.prototypes:
        prof = load_profile(proto.profile)
        spec = prototype_model(cfg, proto.name)
        cases.append((f"{spec.builder} (digits {proto.name})", "digits", prof, spec, "digits"))
    return cases


def trained_delta(
    profile: DeviceProfile, spec: ModelSpec, data: str, seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """(global state, trained state, parameter count) after one local epoch."""
    torch.manual_seed(seed)
    if data == "digits":
        ds = load_digits()
        x, y = ds.x[:SAMPLES], ds.y[:SAMPLES]
        shape = ds.input_shape
    else:
        shape = get_entry(spec.builder).default_input_shape
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(SAMPLES, *shape, generator=g)
        y = torch.randint(0, 10, (SAMPLES,), generator=g)
    model = build_model(spec.builder, 10, shape, **spec.args)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    training = profile.training.model_copy(
        update={"epochs": 1, "batch_size": 16, "time_budget_s": None, "threads": 1}
    )
    result = train_local(model, x, y, training, seed=seed)
    return base, result.state, count_parameters(model)


def update_wire_bytes(
    base: dict[str, torch.Tensor],
    trained: dict[str, torch.Tensor],
    compression: Compression,
    chunk_size: int,
) -> dict[str, Any]:
    """Blob, chunk-header, update-header and MQTT framing bytes of one update."""
    task = TaskMessage(
        round_id=1,
        agent_id=AGENT,
        prototype="P",
        model=ModelRef(builder="x"),
        num_classes=10,
        input_shape=(1, 1, 1),
        seed=0,
        deadline=0.0,
        compression=compression,
        chunk_size=chunk_size,
        blob=BlobRef(digest="00" * 32, size=0, chunk_size=1, count=1),
    )
    up = prepare_update(
        task,
        trained,
        base,
        secret=generate_secret(),
        num_samples=SAMPLES,
        metrics={"train_loss": 1.0, "train_s": 1.0},
    )
    topics = Topics(FLEET)
    header = encode_message(up.header)
    chunks = split(up.blob, chunk_size)
    chunk_topic = topics.up(AGENT, Up.CHUNK)
    framing = mqtt_publish_bytes(topics.up(AGENT, Up.UPDATE), len(header)) - len(header)
    framing += sum(
        mqtt_publish_bytes(chunk_topic, len(c.payload) + CHUNK_HEADER_BYTES)
        - len(c.payload)
        - CHUNK_HEADER_BYTES
        for c in chunks
    )
    delta = make_delta(trained, base)
    decoded = decode_state(up.blob)
    amax = max(float(v.abs().max()) for v in delta.values() if v.is_floating_point() and v.numel())
    err = max(
        float((decoded[k] - v).abs().max())
        for k, v in delta.items()
        if v.is_floating_point() and v.numel()
    )
    total = len(up.blob) + CHUNK_HEADER_BYTES * len(chunks) + len(header) + framing
    return {
        "blob_bytes": len(up.blob),
        "chunks": len(chunks),
        "chunk_header_bytes": CHUNK_HEADER_BYTES * len(chunks),
        "update_header_bytes": len(header),
        "mqtt_framing_bytes": framing,
        "wire_bytes": total,
        "max_rel_error": err / amax if amax else 0.0,
    }


def size_rows() -> list[dict[str, Any]]:
    rows = []
    for label, source, prof, spec, data in model_cases():
        base, trained, params = trained_delta(prof, spec, data)
        chunk_size = prof.comms.chunk_size_kib * 1024
        row: dict[str, Any] = {
            "model": label,
            "source": source,
            "builder": spec.builder,
            "params": params,
            "chunk_kib": prof.comms.chunk_size_kib,
            "profile_compression": prof.comms.compression,
        }
        for c in MODES:
            row[c] = update_wire_bytes(base, trained, c, chunk_size)
        rows.append(row)
    return rows


def size_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title=f"Bytes on the wire per update ({DELTA_KIND})")
    for col in (
        "model",
        "params",
        "chunk KiB",
        "fp32 bytes",
        "fp16 bytes",
        "int8 bytes",
        "fp16/fp32",
        "int8/fp32",
        "overhead fp16",
        "int8 max rel err",
    ):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        f32, f16, i8 = (r[c]["wire_bytes"] for c in MODES)
        over = (r["fp16"]["wire_bytes"] - r["fp16"]["blob_bytes"]) / r["fp16"]["wire_bytes"]
        t.add_row(
            r["model"],
            f"{r['params']:,}",
            str(r["chunk_kib"]),
            f"{f32:,}",
            f"{f16:,}",
            f"{i8:,}",
            f"{f16 / f32:.3f}",
            f"{i8 / f32:.3f}",
            f"{100 * over:.2f}%",
            f"{r['int8']['max_rel_error']:.4f}",
        )
    return t


# -- 2. throughput -----------------------------------------------------------------------------
@contextmanager
def broker_settings(kind: str, tmp: Path) -> Iterator[tuple[MqttSettings, MqttSettings]]:
    """(coordinator settings, agent settings) for a broker of ``kind`` on loopback."""
    base = MqttSettings(keepalive_s=30, reconnect_min_s=1, reconnect_max_s=2)
    if kind == "embedded":
        access = BrokerAccess.for_fleet(
            FLEET, ("takfl-coordinator", "coord-pw"), {AGENT: "agent-pw"}
        )
        with EmbeddedBroker(access=access) as b:
            s = replace(base, port=b.port)
            yield (
                replace(s, username="takfl-coordinator", password="coord-pw"),
                replace(s, username=AGENT, password="agent-pw"),
            )
        return
    files = write_mosquitto_config(
        tmp / "mosquitto",
        fleet=FLEET,
        port=free_port(),
        coordinator=("takfl-coordinator", "coord-pw"),
        agents={AGENT: "agent-pw"},
        run_as=getpass.getuser(),
    )
    with MosquittoProcess(files) as m:
        s = replace(base, port=m.port)
        yield (
            replace(s, username="takfl-coordinator", password="coord-pw"),
            replace(s, username=AGENT, password="agent-pw"),
        )


def blob_transfer_seconds(
    coord: MqttSettings, agent: MqttSettings, blob: bytes, chunk_size: int
) -> float:
    """Seconds from the first chunk published to the blob verified at the receiver."""
    topics = Topics(FLEET)
    topic = topics.up(AGENT, Up.CHUNK)
    receiver = BlobReceiver(ReassemblyLimits(), quiet_s=60)
    done = threading.Event()

    def on_chunk(_t: str, payload: bytes) -> None:
        if receiver.add(AGENT, decode_chunk(payload)) is not None:
            done.set()

    rx = MqttClient(coord, "takfl-coordinator", persistent=False)
    rx.route(topic, on_chunk)
    rx.start(timeout=10)
    tx = MqttClient(agent, AGENT, persistent=False)
    tx.start(timeout=10)
    try:
        receiver.expect(AGENT, blob_ref(blob, chunk_size))
        chunks: list[Chunk] = split(blob, chunk_size)
        payloads = [encode_chunk(c) for c in chunks]
        start = time.perf_counter()
        for p in payloads:
            tx.publish(topic, p)
        if not done.wait(120):
            raise TimeoutError("blob did not arrive within 120 s")
        return time.perf_counter() - start
    finally:
        tx.stop()
        rx.stop()


def update_seconds(
    coord: MqttSettings, agent: MqttSettings, mib: float, record: AgentRecord
) -> tuple[float, int]:
    """Seconds for one fp32 update of a ~``mib`` MiB model, AgentLink -> MqttTransport
    (encode, send, reassemble, verify, decode, validate, reconstruct)."""
    n = int(mib * 1024 * 1024 / 4 / 1024)
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(n, 1024, generator=g), "n": torch.tensor(1)}
    trained = {"w": state["w"] + 1e-3, "n": torch.tensor(2)}
    identity = AgentIdentity(agent_id=AGENT, prototype="P", secret=record.secret, num_samples=1)
    with (
        MqttTransport(
            coord,
            FLEET,
            {AGENT: record},
            num_classes=10,
            input_shape=(1, 8, 8),
            policy=TransportPolicy(),
            client_id="takfl-coordinator",
        ) as transport,
        AgentLink(agent, FLEET, identity, policy=LinkPolicy()) as link,
    ):
        if not transport.wait_for_agents([AGENT], 10):
            raise TimeoutError("agent did not register")
        transport.send_tasks(
            [
                Task(
                    round_id=1,
                    prototype="P",
                    client_id=AGENT,
                    model=ModelSpec(builder="mlp_digits"),
                    global_state=state,
                    deadline=time.time() + 300,
                )
            ]
        )
        task = link.next_task(timeout=60)
        if task is None:
            raise TimeoutError("task did not arrive")
        start = time.perf_counter()
        header = link.send_update(task, trained, num_samples=1, compression="fp32")
        update = transport.next_update(timeout=120)
        elapsed = time.perf_counter() - start
        if update is None:
            raise TimeoutError("update did not arrive")
        return elapsed, header.blob.size


def throughput_rows(runs: int, mib: float) -> list[dict[str, Any]]:
    kinds = ["embedded"] + (["mosquitto"] if find_mosquitto() else [])
    blob = random.Random(0).randbytes(int(mib * 1024 * 1024))
    rows = []
    for kind in kinds:
        with tempfile.TemporaryDirectory() as tmp, broker_settings(kind, Path(tmp)) as (c, a):
            blob_times = [blob_transfer_seconds(c, a, blob, 128 * 1024) for _ in range(runs)]
            record = AgentRecord(
                agent_id=AGENT, prototype="P", secret=generate_secret()
            )  # one agent across runs
            upd = [update_seconds(c, a, mib, record) for _ in range(max(1, runs // 2))]
        med = statistics.median(blob_times)
        upd_med = statistics.median(t for t, _ in upd)
        rows.append(
            {
                "broker": kind,
                "blob_bytes": len(blob),
                "chunk_bytes": 128 * 1024,
                "runs": runs,
                "blob_seconds": blob_times,
                "blob_mb_s": len(blob) / med / 1e6,
                "blob_mb_s_best": len(blob) / min(blob_times) / 1e6,
                "update_bytes": upd[0][1],
                "update_seconds": [t for t, _ in upd],
                "update_mb_s": upd[0][1] / upd_med / 1e6,
            }
        )
    if "mosquitto" not in kinds:
        rows.append({"broker": "mosquitto", "skipped": "mosquitto binary not installed"})
    return rows


def throughput_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="Loopback throughput, QoS 1, 128 KiB chunks (median; MB = 10^6 B)")
    for col in (
        "broker",
        "blob MiB",
        "blob MB/s",
        "best MB/s",
        "update MB",
        "update s",
        "update MB/s",
    ):
        t.add_column(col, justify="left" if col == "broker" else "right")
    for r in rows:
        if "skipped" in r:
            t.add_row(r["broker"], "-", r["skipped"], "", "", "", "")
            continue
        t.add_row(
            r["broker"],
            f"{r['blob_bytes'] / 2**20:.1f}",
            f"{r['blob_mb_s']:.1f}",
            f"{r['blob_mb_s_best']:.1f}",
            f"{r['update_bytes'] / 1e6:.2f}",
            f"{statistics.median(r['update_seconds']):.3f}",
            f"{r['update_mb_s']:.1f}",
        )
    return t


def environment() -> dict[str, Any]:
    import amqtt
    import paho.mqtt

    mosq = find_mosquitto()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "paho_mqtt": paho.mqtt.__version__,
        "amqtt": getattr(amqtt, "__version__", "?"),
        "mosquitto": mosq or "not installed",
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None, out: Callable[[Any], None] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--blob-mib", type=float, default=5.0)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    console = Console(width=200)
    show = out or console.print
    sizes = size_rows()
    show(size_table(sizes))
    result: dict[str, Any] = {
        "delta": DELTA_KIND,
        "update_sizes": sizes,
        "environment": environment(),
    }
    if not args.skip_throughput:
        tp = throughput_rows(args.runs, args.blob_mib)
        show(throughput_table(tp))
        result["throughput"] = tp
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    show(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
