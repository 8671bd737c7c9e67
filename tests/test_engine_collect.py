"""The round engine's collect loop: deadline, quorum and hard limit.

The transport is a scripted fake and the clock is the engine's injectable one, so
time passes only when the engine waits on the transport: no real clients, no sleeps.
"""

from __future__ import annotations

import pytest
import torch

from coordinator.engine import RoundEngine, RoundPolicy, ServerData, _Collector
from coordinator.transport.base import ClientUpdate, Task, Transport
from coordinator.transport.intake import Decision, refused_answer
from takfl.algorithms import resolve_algorithm
from takfl.config import load_federation, prototype_model
from takfl.wire.messages import Ack
from takfl.wire.validation import Refusal, refuse

PLAN = {"S": ["S-000", "S-001"], "M": ["M-000", "M-001"], "L": ["L-000"]}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedTransport(Transport):
    """Delivers each (arrival time, update) once the clock reaches it; waiting for an
    update moves the clock forward by the time waited."""

    def __init__(self, clock: FakeClock, script: list[tuple[float, ClientUpdate]]) -> None:
        self.clock = clock
        self.script = sorted(script, key=lambda item: item[0])
        self.waits: list[float] = []
        self.refusals: list[tuple[float, tuple[int, str]]] = []  # (time, (round, client))

    def clients(self) -> dict[str, list[str]]:
        return PLAN

    def send_tasks(self, tasks: list[Task]) -> None:
        return None

    def refused_answers(self) -> list[tuple[int, str]]:
        due = [r for t, r in self.refusals if t <= self.clock.now]
        self.refusals = [(t, r) for t, r in self.refusals if t > self.clock.now]
        return due

    def next_update(self, timeout: float) -> ClientUpdate | None:
        self.waits.append(timeout)
        if self.script and self.script[0][0] <= self.clock.now + timeout:
            at, upd = self.script.pop(0)
            self.clock.now = max(self.clock.now, at)
            return upd
        self.clock.now += timeout
        return None


def make_engine(
    policy: RoundPolicy, arrivals: dict[str, float], round_id: int = 1
) -> tuple[RoundEngine, ScriptedTransport, FakeClock]:
    """``arrivals``: client id -> seconds after the round opens."""
    cfg = load_federation("digits")
    models = {p.name: prototype_model(cfg, p.name) for p in cfg.prototypes}
    data = ServerData(
        public_x=torch.randn(4, 1, 8, 8),
        val_x=torch.randn(4, 1, 8, 8),
        val_y=torch.zeros(4, dtype=torch.long),
        test_x=torch.randn(4, 1, 8, 8),
        test_y=torch.zeros(4, dtype=torch.long),
        num_classes=10,
        input_shape=(1, 8, 8),
    )
    clock = FakeClock()
    transport = ScriptedTransport(clock, [])
    engine = RoundEngine(
        cfg,
        models,
        data,
        transport,
        algorithm=resolve_algorithm(cfg.algorithm, "fedavg"),
        policy=policy,
        clock=clock,
    )
    start = clock.now
    transport.script = sorted(
        (
            (
                start + t,
                ClientUpdate(
                    round_id=round_id,
                    prototype=cid[0],
                    client_id=cid,
                    num_samples=5,
                    state=engine.globals[cid[0]],
                ),
            )
            for cid, t in arrivals.items()
        ),
        key=lambda item: item[0],
    )
    return engine, transport, clock


def collect(engine: RoundEngine) -> dict[str, set[str]]:
    collectors = {p: _Collector(engine.aggregator, engine.globals[p], False) for p in PLAN}
    return engine.collect(1, PLAN, collectors)


EVERYONE = {cid: 1.0 + i for i, cid in enumerate(c for ids in PLAN.values() for c in ids)}


def test_closes_as_soon_as_every_client_replied() -> None:
    engine, _, clock = make_engine(RoundPolicy(deadline_s=60, quorum=1.0, max_wait_s=60), EVERYONE)
    start = clock.now
    got = collect(engine)
    assert got == {p: set(ids) for p, ids in PLAN.items()}
    assert clock.now - start == pytest.approx(max(EVERYONE.values()))


def test_deadline_with_quorum_closes_without_the_late_client() -> None:
    arrivals = {**EVERYONE, "S-001": 90.0}  # past the 60 s deadline
    engine, transport, clock = make_engine(
        RoundPolicy(deadline_s=60, quorum=0.5, max_wait_s=120), arrivals
    )
    start = clock.now
    got = collect(engine)
    assert got["S"] == {"S-000"}
    assert got["M"] == {"M-000", "M-001"} and got["L"] == {"L-000"}
    assert 60 <= clock.now - start < 62  # closed at the deadline, not at 90 s
    assert len(transport.script) == 1  # the late update was never taken


def test_without_quorum_the_round_waits_past_the_deadline_until_quorum() -> None:
    arrivals = {"S-000": 1.0, "M-000": 2.0, "M-001": 3.0, "S-001": 5.0, "L-000": 100.0}
    engine, _, clock = make_engine(RoundPolicy(deadline_s=60, quorum=1.0, max_wait_s=120), arrivals)
    start = clock.now
    got = collect(engine)
    assert got["L"] == {"L-000"}  # L's only client is needed for the quorum
    assert clock.now - start == pytest.approx(100.0)


def test_hard_limit_closes_a_round_that_never_reaches_quorum() -> None:
    arrivals = {"S-000": 1.0, "M-000": 2.0}  # S-001, M-001 and L-000 never answer
    engine, _, clock = make_engine(RoundPolicy(deadline_s=30, quorum=1.0, max_wait_s=45), arrivals)
    start = clock.now
    got = collect(engine)
    assert got == {"S": {"S-000"}, "M": {"M-000"}, "L": set()}
    assert 75 <= clock.now - start < 77  # deadline + max_wait


def test_stale_unknown_and_duplicate_updates_are_counted_and_ignored() -> None:
    engine, transport, _ = make_engine(
        RoundPolicy(deadline_s=10, quorum=1.0, max_wait_s=0), {"S-000": 1.0}
    )
    g = engine.globals
    transport.script += [
        (
            1001.5,
            ClientUpdate(round_id=0, prototype="S", client_id="S-001", num_samples=5, state=g["S"]),
        ),  # an old round
        (
            1002.0,
            ClientUpdate(round_id=1, prototype="S", client_id="S-009", num_samples=5, state=g["S"]),
        ),  # not sampled
        (
            1003.0,
            ClientUpdate(round_id=1, prototype="S", client_id="S-000", num_samples=5, state=g["S"]),
        ),  # a duplicate
    ]
    transport.script.sort(key=lambda item: item[0])
    got = collect(engine)
    assert got["S"] == {"S-000"}
    assert engine.rejected == 3


def test_a_tier_of_thousands_is_collected_every_client_once() -> None:
    # Prepare: 20,000 sampled clients answering at once (the loop's cost per update is
    # measured by benchmarks/agents_scale.py; here only its bookkeeping)
    engine, transport, clock = make_engine(RoundPolicy(deadline_s=60, quorum=1.0), {})
    engine.guard = None  # this test is about the loop's bookkeeping
    clients = [f"S-{i:05d}" for i in range(20_000)]
    state = engine.globals["S"]
    transport.script = [
        (
            clock.now,
            ClientUpdate(round_id=1, prototype="S", client_id=c, num_samples=5, state=state),
        )
        for c in clients
    ]
    plan = {"S": clients}
    collectors = {"S": _Collector(engine.aggregator, state, False)}

    # Execute
    got = engine.collect(1, plan, collectors)

    # Assert
    assert got == {"S": set(clients)}
    assert engine.rejected == 0


def test_clients_refused_on_receipt_are_not_awaited() -> None:
    # Prepare: M-001 and L-000's updates are refused by the transport's intake (their
    # final answer, e.g. over a bound); an old round's refusal of S-001 changes nothing
    arrivals = {"S-000": 1.0, "S-001": 3.0, "M-000": 4.0}
    engine, transport, clock = make_engine(
        RoundPolicy(deadline_s=60, quorum=1.0, max_wait_s=600), arrivals
    )
    start = clock.now
    transport.refusals = [(start + 2.0, (1, "M-001")), (start + 2.5, (1, "L-000"))]
    transport.refusals.append((start + 0.5, (0, "S-001")))
    # Execute
    got = collect(engine)
    # Assert: closed once the last awaited client answered, not at deadline + max_wait
    assert got == {"S": {"S-000", "S-001"}, "M": {"M-000"}, "L": set()}
    assert clock.now - start < 6


@pytest.mark.parametrize(
    "reason, final",
    [
        (Refusal.NORM_BOUND, True),  # over a bound: the agent will not offer it again
        (Refusal.DIGEST_MISMATCH, True),
        (Refusal.BAD_SIGNATURE, False),  # not known to be the agent's
        (Refusal.STALE_ROUND, False),  # not this round's answer
        (Refusal.DUPLICATE, False),  # the agent already answered
    ],
)
def test_which_intake_refusals_are_a_clients_final_answer(reason: Refusal, final: bool) -> None:
    ack = Ack(
        subject="update",
        agent_id="L-000",
        round_id=2,
        digest="ab" * 32,
        accepted=False,
        reason=reason.value,
    )
    decision = Decision(agent="L-000", verdict=refuse(reason, "x"), ack=ack)
    assert refused_answer(decision) == ((2, "L-000") if final else None)
    assert refused_answer(Decision(agent="L-000", verdict=refuse(reason, "x"))) is None  # no ack
