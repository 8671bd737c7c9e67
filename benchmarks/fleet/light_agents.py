"""Light agents: real ``AgentLink`` clients (one MQTT connection each) that do not train.

A worker process serves its share of the agents from one thread (:class:`SharedLoop`:
every connection on one selector, ``AgentLink``'s own units deciding what to send). It
connects them on ``go``; an agent answers each task as soon as its global model is
complete, with the global state plus a small deterministic perturbation (a valid,
non-zero delta), from the same thread; on ``stop`` it closes them and reports their
counters.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, cast

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
from benchmarks.fleet.loop_client import LoopClient, SharedLoop
from edge_agent.link import AgentIdentity, AgentLink, ClientFactory, LinkPolicy, ReceivedTask
from edge_agent.secure_round import run_secure_round
from takfl.mqtt.client import MqttSettings
from takfl.mqtt.credentials import mqtt_password
from takfl.wire.messages import SignedMessage, UpdateHeader
from takfl.wire.topics import Up
from takfl.wire.update import PreparedUpdate

PERTURBATION = 1e-3
MQTT_COUNTERS = (
    "dropped",
    "publish_refused",
    "disconnects",
    "handler_errors",
    "bytes_sent",
    "bytes_received",
)
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


CONNECT_BATCH = 50  # connections opened per turn of the loop


class Fleet:
    """The worker's agents on one :class:`SharedLoop`; each answers its tasks at once."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.loop = SharedLoop(tick_s=1.0)
        self.links: list[Served] = []
        self.answered = 0
        # agents that leave a secure round after sharing their keys (before their input)
        self.dropping = {a["agent_id"] for a in spec["agents"] if a.get("drops")}
        policy = LinkPolicy()
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
            link = AgentLink(
                settings,
                spec["fleet"],
                identity,
                policy=policy,
                client_factory=cast(ClientFactory, self._client),
            )
            link.client.owner = (a["index"], link, a["num_samples"])  # type: ignore[attr-defined]
            self.links.append((a["index"], link, a["num_samples"]))
        self.loop.after_message = self._answer

    def _client(self, settings: MqttSettings, client_id: str, **kw: Any) -> LoopClient:
        return LoopClient(self.loop, settings, client_id, **kw)

    def _answer(self, client: LoopClient) -> None:
        """After a message to ``client``'s agent: answer the task it completed, if any."""
        index, link, n = client.owner
        task = link.next_task(0.0)
        if task is not None:
            seed = task.message.round_id * 100_003 + index
            trained = perturbed(task.global_state, seed)
            if task.message.secagg is not None:  # its stages wait: a thread of its own
                threading.Thread(
                    target=self._secure, args=(link, task, trained, n), daemon=True
                ).start()
            else:
                link.send_update(task, trained, num_samples=n)
            self.answered += 1

    def _secure(
        self, link: AgentLink, task: ReceivedTask, trained: dict[str, torch.Tensor], n: int
    ) -> None:
        """Take part in a secure round; an agent of ``dropping`` sends its keys and shares,
        then nothing (the costliest dropout for the coordinator: its masks must be
        recovered from its neighbours' shares)."""
        own = link.secure_send()
        me = link.identity.agent_id
        gone = threading.Event()

        # the shared loop's connections are written by the loop thread only
        def publish(leaf: Up, message: SignedMessage) -> None:
            self.loop.call_soon(lambda: own.publish(leaf, message))

        def send_update(prepared: PreparedUpdate, deadline: float) -> UpdateHeader:
            if me in self.dropping:
                gone.set()
            else:
                self.loop.call_soon(lambda: own.send_update(prepared, deadline))
            return prepared.header

        send = replace(own, publish=publish, send_update=send_update)
        run_secure_round(
            task.message,
            trained,
            task.global_state,
            link.secure_inbox,
            send,
            num_samples=n,
            give_up=gone.is_set,
        )

    def connect(self, timeout_s: float) -> dict[str, Any]:
        """Open every connection (in batches, on the loop thread); how many were connected
        and subscribed within ``timeout_s`` and how long it took."""
        t0 = time.perf_counter()
        self.loop.start()
        for k in range(0, len(self.links), CONNECT_BATCH):
            batch = [link for _, link, _ in self.links[k : k + CONNECT_BATCH]]
            done = threading.Event()

            def open_batch(batch: list[AgentLink] = batch, done: threading.Event = done) -> None:
                for link in batch:
                    link.client.start(None)
                done.set()

            self.loop.call_soon(open_batch)
            done.wait(timeout_s)
        end = t0 + timeout_s
        ready = sum(
            link.client.wait_ready(max(0.0, end - time.perf_counter())) for _, link, _ in self.links
        )
        return {"connected": ready, "connect_s": time.perf_counter() - t0}

    def close(self) -> None:
        """Each agent's offline status and a clean disconnect, then the loop stops."""
        done = threading.Event()

        def close_all() -> None:
            for _, link, _ in self.links:
                link.close()
            done.set()

        self.loop.call_soon(close_all)
        done.wait(60.0)
        time.sleep(1.0)  # let the loop write what the closes queued
        self.loop.stop()


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
    fleet = Fleet(spec)
    say(READY)
    try:
        await_command(commands, GO, spec["startup_timeout_s"])
        say(STARTED, fleet.connect(spec["connect_timeout_s"]))
        while commands.get() not in (STOP, EOF):
            pass
    finally:
        fleet.close()
    say(STOPPED, link_counters(fleet.links, fleet.answered))
    return 0
