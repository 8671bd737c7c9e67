"""What hostile input costs the coordinator and the agents, with the limits off and on.

    python benchmarks/attacks.py [--requests 100] [--oversize-mb 250] [--oversize-count 8]

1. Amplification: a provisioned agent (its own secret, nothing else) sends ``--requests``
   signed chunk requests, each for every chunk of its task's global model (the digits L
   model, fp32, 128 KiB chunks); and the coordinator's side sends as many requests to an
   agent for every chunk of its update. Bytes re-sent per byte of request, through
   Mosquitto and the embedded broker, with re-send limits off (``UNLIMITED``: what the
   code did before the limits, every request answered in full) and on (the defaults,
   ``ResendLimits``).
2. Oversized input: the agent publishes ``--oversize-count`` messages of ``--oversize-mb``
   MB on its update topic. The coordinator runs in a child process; its peak resident
   memory (VmHWM) is read before and after. Mosquitto without size limits and a client
   without a payload cap (before) against the generated configuration and the client's
   cap (after).

Prints tables and writes benchmarks/results/attacks.json (with ``--skip-oversize``, the
oversize figures already in that file are kept).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import torch
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

from coordinator.broker import EmbeddedBroker, MosquittoProcess, find_mosquitto, free_port
from coordinator.broker.acl import BrokerAccess
from coordinator.broker.mosquitto import write_mosquitto_config
from coordinator.transport.base import Task
from coordinator.transport.mqtt import MqttTransport, TransportPolicy
from edge_agent.link import AgentIdentity, AgentLink, LinkPolicy
from takfl.config import load_federation, prototype_model
from takfl.config.base import ModelSpec
from takfl.models import build_model
from takfl.mqtt.client import MqttSettings
from takfl.mqtt.ratelimit import UNLIMITED, ResendLimits
from takfl.wire.messages import MAX_PACKET_BYTES, ChunkRequest, encode_message
from takfl.wire.signing import generate_secret, sign
from takfl.wire.topics import Down, Topics, Up
from takfl.wire.update import prepare_update
from takfl.wire.validation import AgentRecord

RESULTS = Path(__file__).resolve().parent / "results" / "attacks.json"
FLEET = "attack"
AGENT = "L-000"
COORD = "takfl-coordinator"
BASE = MqttSettings(keepalive_s=30, reconnect_min_s=1, reconnect_max_s=2)


# -- brokers --------------------------------------------------------------------------------
@contextmanager
def broker(
    kind: str, tmp: Path, limits: bool = True
) -> Iterator[tuple[MqttSettings, MqttSettings]]:
    """(coordinator settings, agent settings) of a fresh broker; Mosquitto with or without
    its size limits."""
    pw = {COORD: "coord-pw", AGENT: "agent-pw"}
    if kind == "embedded":
        access = BrokerAccess.for_fleet(FLEET, (COORD, pw[COORD]), {AGENT: pw[AGENT]})
        with EmbeddedBroker(access=access) as b:
            s = replace(BASE, port=b.port)
            yield (
                replace(s, username=COORD, password=pw[COORD]),
                replace(s, username=AGENT, password=pw[AGENT]),
            )
        return
    files = write_mosquitto_config(
        tmp / "mosquitto",
        fleet=FLEET,
        port=free_port(),
        coordinator=(COORD, pw[COORD]),
        agents={AGENT: pw[AGENT]},
        run_as=getpass.getuser(),
        use_tool=False,
        persistence=False,
        max_packet_bytes=MAX_PACKET_BYTES if limits else None,
    )
    with MosquittoProcess(files) as m:
        s = replace(BASE, port=m.port)
        yield (
            replace(s, username=COORD, password=pw[COORD]),
            replace(s, username=AGENT, password=pw[AGENT]),
        )


def settle(
    read: Callable[[], int], quiet_s: float = 3.0, limit_s: float = 180.0, first_s: float = 60.0
) -> int:
    """``read()`` once it has moved from 0 (or ``first_s`` passed: a broker may still be
    delivering an earlier flood) and then not changed for ``quiet_s``."""
    end = time.monotonic() + first_s
    while read() == 0 and time.monotonic() < end:
        time.sleep(0.2)
    end = time.monotonic() + limit_s
    last, since = read(), time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.2)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


# -- 1. amplification ---------------------------------------------------------------------------
def l_model() -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The digits federation's L model and its initial weights."""
    spec = prototype_model(load_federation("digits"), "L")
    model = build_model(spec.builder, 10, (1, 8, 8), **spec.args)
    return spec, {k: v.detach().clone() for k, v in model.state_dict().items()}


def amplification(kind: str, resend: ResendLimits, requests: int, tmp: Path) -> dict[str, Any]:
    secret = generate_secret()
    registry = {AGENT: AgentRecord(agent_id=AGENT, prototype="L", secret=secret)}
    spec, state = l_model()
    with broker(kind, tmp) as (coord, agent):
        transport = MqttTransport(
            coord,
            FLEET,
            registry,
            num_classes=10,
            input_shape=(1, 8, 8),
            policy=TransportPolicy(quiet_s=600, task_retry_s=600, resend=resend),
            client_id=COORD,
        ).start(timeout=10)
        link = AgentLink(
            agent,
            FLEET,
            AgentIdentity(agent_id=AGENT, prototype="L", secret=secret, num_samples=10),
            policy=LinkPolicy(quiet_s=600, ack_timeout_s=600, resend=resend),
        ).start(timeout=10)
        try:
            if not transport.wait_for_agents([AGENT], 30):
                raise RuntimeError("agent did not register")
            transport.send_tasks(
                [
                    Task(
                        round_id=1,
                        prototype="L",
                        client_id=AGENT,
                        model=spec,
                        global_state=state,
                        deadline=time.time() + 600,
                    )
                ]
            )
            task = link.next_task(timeout=60)
            if task is None:
                raise RuntimeError("no task")
            blob = task.message.blob
            ask = sign(
                ChunkRequest(agent_id=AGENT, digest=blob.digest, missing=list(range(blob.count))),
                secret,
            )
            payload = encode_message(ask)
            for _ in range(requests):
                link.client.publish(link.topics.up(AGENT, Up.REQUEST), payload)
            coord_out = settle(lambda: transport.sender.resent_bytes)

            trained = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
            up = prepare_update(
                task.message, trained, task.global_state, secret=secret, num_samples=10
            )
            link.send_prepared(up, deadline=task.message.deadline)
            if transport.next_update(timeout=60) is None:
                raise RuntimeError("update not accepted")
            ref = up.header.blob
            back = sign(
                ChunkRequest(agent_id=AGENT, digest=ref.digest, missing=list(range(ref.count))),
                secret,
            )
            back_payload = encode_message(back)
            topic = Topics(FLEET).down(AGENT, Down.REQUEST)
            for _ in range(requests):
                transport.client.publish(topic, back_payload)
            agent_out = settle(lambda: link.sender.resent_bytes)
        finally:
            link.close()
            transport.close()
    return {
        "broker": kind,
        "limits": "off" if resend is UNLIMITED else "on",
        "requests": requests,
        "request_bytes": len(payload),
        "global_blob_bytes": blob.size,
        "coordinator_bytes_out": coord_out,
        "coordinator_ratio": coord_out / (requests * len(payload)),
        "update_blob_bytes": ref.size,
        "agent_request_bytes": len(back_payload),
        "agent_bytes_out": agent_out,
        "agent_ratio": agent_out / (requests * len(back_payload)),
    }


# -- 2. oversized input --------------------------------------------------------------------------
def child_main(spec: str) -> int:
    """The coordinator process of the oversize test: start, report memory on request."""
    cfg = json.loads(spec)
    settings = replace(
        BASE,
        port=cfg["port"],
        username=COORD,
        password=cfg["password"],
        max_payload_bytes=cfg["max_payload_bytes"],
    )
    registry = {
        AGENT: AgentRecord(agent_id=AGENT, prototype="L", secret=bytes.fromhex(cfg["secret"]))
    }
    transport = MqttTransport(
        settings, FLEET, registry, num_classes=10, input_shape=(1, 8, 8), client_id=COORD
    ).start(timeout=10)
    print(json.dumps({"ready": True, **memory()}), flush=True)
    for line in sys.stdin:
        if line.strip() == "report":
            c = transport.client.counters
            print(
                json.dumps({**memory(), "received": c.received, "oversized": c.oversized}),
                flush=True,
            )
            break
    transport.close()
    return 0


def memory() -> dict[str, float]:
    """VmHWM (peak) and VmRSS of this process, MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) / 1024
    return out


def oversize(limits: bool, count: int, size_mb: int, tmp: Path) -> dict[str, Any]:
    secret = generate_secret()
    with broker("mosquitto", tmp, limits=limits) as (coord, agent):
        spec = {
            "port": coord.port,
            "password": coord.password,
            "secret": secret.hex(),
            "max_payload_bytes": BASE.max_payload_bytes if limits else 2**31,
        }
        child = subprocess.Popen(
            [sys.executable, __file__, "--child-coordinator", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert child.stdin is not None and child.stdout is not None
        before = json.loads(child.stdout.readline())
        attacker = paho.Client(CallbackAPIVersion.VERSION2, client_id=AGENT)
        attacker.username_pw_set(AGENT, agent.password)
        attacker.connect(agent.host, agent.port)
        attacker.loop_start()
        topic = Topics(FLEET).up(AGENT, Up.UPDATE)
        payload = b"\x00" * (size_mb * 1_000_000)
        t0 = time.monotonic()
        for _ in range(count):
            info = attacker.publish(topic, payload, qos=0)
            with contextlib.suppress(RuntimeError, ValueError):  # disconnected by the broker
                info.wait_for_publish(60)
        del payload
        attacker.loop_stop()
        attacker.disconnect()
        time.sleep(5.0)  # let the coordinator take in whatever the broker forwarded
        child.stdin.write("report\n")
        child.stdin.flush()
        after = json.loads(child.stdout.readline())
        child.kill()  # the figures are in; no need for a clean shutdown
        child.wait(30)
    return {
        "limits": "on" if limits else "off",
        "messages": count,
        "message_mb": size_mb,
        "seconds": time.monotonic() - t0,
        "coordinator_rss_mb_before": before["VmRSS"],
        "coordinator_peak_mb_after": after["VmHWM"],
        "messages_reaching_coordinator": after["received"],
        "dropped_by_client": after["oversized"],
    }


# -- report --------------------------------------------------------------------------------------
def amplification_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="Chunk-request amplification (bytes re-sent per byte of request)")
    for col in (
        "broker",
        "limits",
        "requests",
        "request B",
        "coordinator out MB",
        "ratio",
        "agent out MB",
        "ratio ",
    ):
        t.add_column(col, justify="left" if col in ("broker", "limits") else "right")
    for r in rows:
        t.add_row(
            r["broker"],
            r["limits"],
            str(r["requests"]),
            str(r["request_bytes"]),
            f"{r['coordinator_bytes_out'] / 1e6:.2f}",
            f"{r['coordinator_ratio']:.0f}x",
            f"{r['agent_bytes_out'] / 1e6:.2f}",
            f"{r['agent_ratio']:.0f}x",
        )
    return t


def oversize_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="Coordinator memory under oversized messages (Mosquitto)")
    for col in ("limits", "messages", "RSS before MB", "peak after MB", "reached coordinator"):
        t.add_column(col, justify="left" if col == "limits" else "right")
    for r in rows:
        t.add_row(
            r["limits"],
            f"{r['messages']} x {r['message_mb']} MB",
            f"{r['coordinator_rss_mb_before']:.0f}",
            f"{r['coordinator_peak_mb_after']:.0f}",
            str(r["messages_reaching_coordinator"]),
        )
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--oversize-mb", type=int, default=250)
    ap.add_argument("--oversize-count", type=int, default=8)
    ap.add_argument("--skip-oversize", action="store_true")
    ap.add_argument("--output", type=Path, default=RESULTS)
    ap.add_argument("--child-coordinator", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_coordinator:
        return child_main(args.child_coordinator)
    torch.set_num_threads(1)
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)  # floods of refusals, by design
    console = Console(width=200)
    kinds = ["embedded"] + (["mosquitto"] if find_mosquitto() else [])
    result: dict[str, Any] = {
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "mosquitto": find_mosquitto() or "not installed",
        }
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        amp = []
        for kind in kinds:
            for resend in (UNLIMITED, ResendLimits()):
                sub = tmp / f"amp-{kind}-{len(amp)}"
                sub.mkdir()
                amp.append(amplification(kind, resend, args.requests, sub))
        console.print(amplification_table(amp))
        result["amplification"] = amp
        if not args.skip_oversize and "mosquitto" in kinds:
            over = []
            for limits in (False, True):
                sub = tmp / f"over-{limits}"
                sub.mkdir()
                over.append(oversize(limits, args.oversize_count, args.oversize_mb, sub))
            console.print(oversize_table(over))
            result["oversize"] = over
    if "oversize" not in result and args.output.exists():  # skipped: keep earlier figures
        earlier = json.loads(args.output.read_text())
        if "oversize" in earlier:
            result["oversize"] = earlier["oversize"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
