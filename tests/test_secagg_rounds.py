"""Secure rounds as the coordinator and the agents run them, broker-free: the
coordinator's :class:`SecureRounds` and one thread per agent running
:func:`run_secure_round`, every message through its wire bytes (signed, decoded
strictly). The sum is exact up to fixed point with and without dropouts at each stage;
past the threshold the round fails with its reason; no individual input is held."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from coordinator.transport.base import SecureSum
from coordinator.transport.secure_rounds import Outgoing, SecureRounds
from edge_agent.secure_round import SecureInbox, SecureSend, run_secure_round
from takfl.config.privacy import PrivacySpec
from takfl.secagg.client import clip_vector
from takfl.secagg.vector import delta_vector, vector_length
from takfl.wire.envelope import SignedMessage
from takfl.wire.messages import TaskMessage, UpdateHeader, decode_message
from takfl.wire.messages import encode_message as encode
from takfl.wire.signing import sign
from takfl.wire.topics import Up
from takfl.wire.update import PreparedUpdate
from tests.test_downlink import task_message
from tests.test_secagg import _arrays, _holds

SECRET = bytes(range(32))
RUN = "ab" * 16
STAGES = ("keys", "shares", "input", "reveal")


def _wire(msg: SignedMessage) -> Any:
    """``msg`` as the receiver reads it: signed, encoded, decoded strictly."""
    return decode_message(type(msg), encode(sign(msg, SECRET)))


class Hub:
    """Carries messages between the agents' sessions and the coordinator's rounds;
    ``drop[agent]`` is the stage from which the agent is gone (its messages never arrive)."""

    def __init__(self, rounds: SecureRounds, agents: list[str], drop: dict[str, str]) -> None:
        self.rounds = rounds
        self.lock = threading.Lock()
        self.inboxes = {a: SecureInbox() for a in agents}
        self.drop = drop
        self.sent: dict[str, set[str]] = {s: set() for s in STAGES}
        self.inputs: dict[str, np.ndarray] = {}  # what each agent sent, for the checks
        self.held_after_input: list[list[np.ndarray]] = []  # the rounds' arrays, each time

    def gone(self, agent: str, stage: str) -> bool:
        at = self.drop.get(agent)
        return at is not None and STAGES.index(stage) >= STAGES.index(at)

    def deliver(self, out: list[Outgoing]) -> None:
        for o in out:
            self.inboxes[o.agent].put(_wire(o.message))

    def send_for(self, agent: str) -> SecureSend:
        def publish(leaf: Up, message: SignedMessage) -> None:
            stage = {Up.SECAGG_KEYS: "keys", Up.SECAGG_SHARES: "shares"}.get(leaf, "reveal")
            if self.gone(agent, stage):
                return
            step: Callable[[str, Any], list[Outgoing]] = {
                "keys": self.rounds.keys,
                "shares": self.rounds.shares,
                "reveal": self.rounds.reveal,
            }[stage]
            with self.lock:
                self.sent[stage].add(agent)
                self.deliver(step(agent, _wire(message)))

        def send_update(prepared: PreparedUpdate, deadline: float) -> UpdateHeader:
            header = _wire(prepared.header)
            if not self.gone(agent, "input"):
                with self.lock:
                    self.sent["input"].add(agent)
                    self.inputs[agent] = np.frombuffer(prepared.blob, dtype="<u4")
                    verdict, out = self.rounds.masked_input(
                        agent, header.round_id, header.prototype, prepared.blob
                    )
                    assert verdict.accepted, verdict
                    self.held_after_input.append(_arrays(self.rounds))
                    self.deliver(out)
            return header

        return SecureSend(publish=publish, send_update=send_update, secret=SECRET)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _task(agent: str, section: Any) -> TaskMessage:
    return task_message(
        bytes(10),
        run=RUN,
        round_id=4,
        agent_id=agent,
        prototype="M",
        compression="fp32",
        secagg=section,
    )


def _states(agents: list[str], seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    base = {
        "a.weight": torch.randn(6, 5, generator=g),
        "a.bias": torch.randn(6, generator=g),
        "bn.num_batches_tracked": torch.tensor(3),
    }
    trained = {
        a: {
            k: (v + 0.05 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for a in agents
    }
    return base, trained


def run(
    n: int,
    drop: dict[str, str],
    *,
    neighbours: int | None = None,
    threshold: int | None = None,
    noise_multiplier: float = 0.0,
) -> tuple[SecureSum, Hub, dict[str, np.ndarray]]:
    """One secure round of ``n`` agents; ``drop``: agent -> the stage it leaves before."""
    agents = [f"M-{i:03d}" for i in range(n)]
    spec = PrivacySpec.model_validate(
        {
            "mode": "secagg",
            "secagg": {"neighbours": neighbours, "threshold": threshold, "clip_norm": 5.0},
        }
    )
    clock = FakeClock()
    rounds = SecureRounds(spec, RUN, clock=clock)
    base, trained = _states(agents)
    sections = rounds.open(4, "M", agents, vector_length(base), 30.0, noise_multiplier)
    hub = Hub(rounds, agents, drop)
    threads = []
    for a in agents:
        stop = threading.Event()
        task = _task(a, sections[a])

        def work(a: str = a, task: TaskMessage = task, stop: threading.Event = stop) -> None:
            if hub.gone(a, "keys"):
                return
            run_secure_round(
                task,
                trained[a],
                base,
                hub.inboxes[a],
                hub.send_for(a),
                num_samples=10,
                give_up=lambda: stop.is_set() or (hub.gone(a, "shares") and a in hub.sent["keys"]),
            )

        t = threading.Thread(target=work, daemon=True)
        threads.append((t, stop))
        t.start()
    results: list[SecureSum] = []
    end = time.monotonic() + 60
    while not results and time.monotonic() < end:
        time.sleep(0.05)
        with hub.lock:
            results = rounds.results()
            if results:
                break
            if _settled(rounds, hub):
                clock.now += 1000.0  # the stage's time runs out for whoever is missing
                hub.deliver(rounds.tick())
                results = rounds.results()
    for t, stop in threads:
        stop.set()
        t.join(10)
    assert len(results) == 1, "the round did not finish"
    deltas = {a: delta_vector(trained[a], base) for a in agents}
    return results[0], hub, deltas


def _settled(rounds: SecureRounds, hub: Hub) -> bool:
    """Everyone still in has answered the open stage (only the dropped are missing)."""
    r = rounds._rounds["M"]
    server = r.server
    stage = server.stage.value
    want = {
        "keys": set(server.params.clients),
        "shares": set(server.keys),
        "inputs": server.shared,
        "unmasking": server.inputs,
    }[stage]
    key = {"keys": "keys", "shares": "shares", "inputs": "input", "unmasking": "reveal"}[stage]
    alive = {a for a in want if not hub.gone(a, key)}
    return alive <= hub.sent[key]


def _exact(result: SecureSum, deltas: dict[str, np.ndarray], bound: float = 5.0) -> None:
    assert result.failure is None and result.total is not None
    true = sum(deltas[a] for a in result.clients)
    err = float(np.abs(result.total - true).max())
    assert err <= len(deltas) / 2**20, err  # fixed point at n = 10 or fewer, C = 5


def test_the_sum_is_exact_without_dropouts() -> None:
    result, _, deltas = run(5, {})
    assert result.clients == tuple(sorted(deltas))
    _exact(result, deltas)


@pytest.mark.parametrize("stage", ["keys", "shares", "input", "reveal"])
def test_the_sum_of_the_others_survives_a_dropout_at_each_stage(stage: str) -> None:
    result, _, deltas = run(5, {"M-001": stage, "M-003": stage})
    gone = stage in ("keys", "shares", "input")
    assert ("M-001" in result.clients) is not gone
    assert len(result.clients) == (3 if gone else 5)
    _exact(result, deltas)


def test_secagg_plus_sparse_graph_with_dropouts() -> None:
    result, _, deltas = run(12, {"M-002": "input", "M-007": "shares"})
    assert len(result.clients) == 10
    _exact(result, deltas)


def test_past_the_threshold_the_round_fails_with_its_reason() -> None:
    result, _, _ = run(5, {a: "input" for a in ("M-000", "M-001", "M-002")})
    assert result.total is None and result.clients == ()
    assert result.failure is not None and result.failure.startswith("too_few_inputs")


def test_the_coordinator_never_holds_an_individual_input() -> None:
    """After every masked input it folds in, nothing the coordinator's rounds hold is an
    agent's delta or its fixed-point encoding (a masked input alone, which the broker
    sees too, reveals nothing without the masks)."""
    result, hub, deltas = run(4, {"M-003": "input"})
    _exact(result, deltas)
    params = hub.rounds._rounds["M"].server.params
    assert len(hub.held_after_input) == 3
    for held in hub.held_after_input:
        for agent in hub.inputs:
            delta = clip_vector(deltas[agent], params.bound)
            assert not _holds(held, delta, params.encoding.encode(delta)), agent


def test_distributed_dp_clients_add_their_share_of_the_sums_noise() -> None:
    """Under secagg-dp each agent adds N(0, (z C)^2 / max(2, t)) per coordinate: the sum of
    the round's inputs differs from the true sum by noise of about sqrt(m) times that."""
    z, n = 0.5, 5
    result, _, deltas = run(n, {}, noise_multiplier=z)
    section_noise = z * 5.0 / math.sqrt(max(2, 3))  # C = 5, t = 3 for 5 agents
    assert result.total is not None and len(result.clients) == n
    residual = result.total - sum(deltas[a] for a in result.clients)
    expected = math.sqrt(n) * section_noise
    assert 0.5 * expected < float(np.std(residual)) < 2.0 * expected
