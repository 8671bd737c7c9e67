"""The agent's end without a broker: its inbound reader (``edge_agent.inbound``) and its
task intake (``edge_agent.intake``), bytes in, decisions out, on a stepped clock."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from edge_agent.inbound import InboundReader, read
from edge_agent.intake import COORDINATOR, IntakePolicy, TaskIntake
from takfl.wire.chunking import ReassemblyLimits, blob_ref, split
from takfl.wire.codec import decode_state, encode_state
from takfl.wire.messages import (
    Ack,
    BlobRef,
    ChunkRequest,
    ModelRef,
    TaskMessage,
    encode_chunk,
    encode_message,
)
from takfl.wire.signing import generate_secret, sign
from takfl.wire.validation import Refusal

CHUNK = 256
SECRET = generate_secret()
PROGRAM = b"training program bytes " * 40


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def global_state(fill: float | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(16, 8, generator=g), "b": torch.zeros(16)}
    if fill is not None:
        state["b"] = torch.full((16,), fill)
    return state


def task(
    blob: bytes,
    *,
    round_id: int = 1,
    agent_id: str = "a1",
    prototype: str = "S",
    program: BlobRef | None = None,
    secret: bytes = SECRET,
) -> TaskMessage:
    msg = TaskMessage(
        round_id=round_id,
        agent_id=agent_id,
        prototype=prototype,
        model=ModelRef(builder="mlp_digits"),
        num_classes=10,
        input_shape=(1, 8, 8),
        seed=7,
        deadline=time.time() + 60,
        compression="fp16",
        chunk_size=CHUNK,
        blob=blob_ref(blob, CHUNK),
        program=program,
    )
    return sign(msg, secret)


def reader() -> InboundReader:
    return InboundReader("a1", SECRET, "S")


def intake(clock: Clock | None = None, **policy: Any) -> TaskIntake:
    return TaskIntake("a1", IntakePolicy(**policy), clock=clock or Clock())


def chunks(blob: bytes) -> list[bytes]:
    return [encode_chunk(c) for c in split(blob, CHUNK)]


# -- the inbound reader --------------------------------------------------------------


def test_a_genuine_task_is_read_as_it_was_sent() -> None:
    # Prepare
    sent = task(encode_state(global_state(), "fp32"))
    # Execute
    received = reader().task(encode_message(sent))
    # Assert
    assert received.ok and received.message == sent


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ({"secret": generate_secret()}, Refusal.BAD_SIGNATURE),
        ({"agent_id": "a2"}, Refusal.BAD_SIGNATURE),  # signed with a1's secret, for a2
        ({"prototype": "L"}, Refusal.WRONG_PROTOTYPE),
    ],
)
def test_a_task_not_signed_for_this_agent_is_refused(
    tamper: dict[str, Any], reason: Refusal
) -> None:
    # Prepare
    sent = task(encode_state(global_state(), "fp32"), **tamper)
    # Execute
    received = reader().task(encode_message(sent))
    # Assert: refused, but what it claimed is kept for the log
    assert not received.ok and received.message is None
    assert received.verdict.reason is reason
    assert received.decoded == sent


def test_undecodable_bytes_are_malformed_and_never_raise() -> None:
    received = read(TaskMessage, b"{not json", agent_id="a1", secret=SECRET)
    assert received.malformed and received.verdict.reason is Refusal.MALFORMED


def test_control_messages_not_signed_for_the_agent_are_counted_as_unauthenticated() -> None:
    # Prepare
    r = reader()
    ack = Ack(subject="update", agent_id="a1", round_id=1, digest="ab" * 32, accepted=True)
    request = ChunkRequest(agent_id="a1", digest="ab" * 32, missing=[0])
    # Execute
    genuine = r.control(Ack, encode_message(sign(ack, SECRET)), "ack")
    forged = r.control(Ack, encode_message(sign(ack, generate_secret())), "ack")
    unsigned = r.control(ChunkRequest, encode_message(request), "chunk request")
    garbage = r.control(Ack, b"\x00", "ack")
    # Assert: malformed bytes are logged, not counted
    assert genuine is not None and genuine.accepted
    assert forged is None and unsigned is None and garbage is None
    assert r.unauthenticated == 2


# -- the task intake -----------------------------------------------------------------


def test_an_accepted_task_is_released_once_its_global_model_arrived() -> None:
    # Prepare
    state = global_state()
    blob = encode_state(state, "fp32")
    sent = task(blob)
    unit = intake()
    # Execute
    first = unit.task(reader().task(encode_message(sent)))
    decisions = [unit.chunk(c) for c in chunks(blob)]
    # Assert
    assert [a.accepted for a in first.acks] == [True] and first.acks[0].reason == "ok"
    assert first.acks[0].round_id == 1 and first.acks[0].digest == sent.blob.digest
    assert first.requests == () and first.ready == ()
    assert all(d.ready == () for d in decisions[:-1])
    (ready,) = decisions[-1].ready
    assert ready.message == sent and ready.program is None
    assert all(torch.equal(ready.global_state[k], v) for k, v in state.items())
    assert unit.counters.tasks == 1 and unit.counters.blob_errors == 0


def test_a_repeated_task_is_acknowledged_and_answered_again() -> None:
    # Prepare
    sent = task(encode_state(global_state(), "fp32"), round_id=3)
    unit = intake()
    unit.task(reader().task(encode_message(sent)))
    # Execute
    again = unit.task(reader().task(encode_message(sent)))
    # Assert
    assert [a.accepted for a in again.acks] == [True]
    assert again.repeated == (3, sent.blob.digest)
    assert unit.counters.tasks == 1


def test_a_task_not_signed_for_the_agent_is_counted_and_not_acknowledged() -> None:
    # Prepare
    sent = task(encode_state(global_state(), "fp32"), secret=generate_secret())
    unit = intake()
    # Execute
    decision = unit.task(reader().task(encode_message(sent)))
    malformed = unit.task(reader().task(b"[]"))
    # Assert
    assert decision.acks == () and malformed.acks == ()
    assert unit.counters.bad_tasks == 2 and unit.counters.tasks == 0
    assert unit.counters.refused == {"bad_signature": 1, "malformed": 1}


def test_a_global_model_over_the_cap_is_refused_as_too_large() -> None:
    # Prepare
    blob = encode_state(global_state(), "fp32")
    unit = intake(limits=ReassemblyLimits(max_blob_bytes=len(blob) - 1))
    # Execute
    decision = unit.task(reader().task(encode_message(task(blob))))
    # Assert
    (ack,) = decision.acks
    assert not ack.accepted and ack.reason == "too_large"
    assert unit.counters.bad_tasks == 1 and unit.counters.refused == {"too_large": 1}


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_non_finite_global_model_is_refused_for_every_task_waiting_for_it(
    poison: float,
) -> None:
    # Prepare: two rounds' tasks share one poisoned global model
    blob = encode_state(global_state(fill=poison), "fp32")
    assert not torch.isfinite(decode_state(blob)["b"]).all()
    unit = intake()
    for round_id in (1, 2):
        unit.task(reader().task(encode_message(task(blob, round_id=round_id))))
    # Execute
    last = [unit.chunk(c) for c in chunks(blob)][-1]
    # Assert: never handed on; both refused
    assert last.ready == ()
    assert [(a.round_id, a.accepted, a.reason) for a in last.acks] == [
        (1, False, "non_finite"),
        (2, False, "non_finite"),
    ]
    assert unit.counters.blob_errors == 1 and unit.counters.refused == {"non_finite": 2}


def test_an_undecodable_global_model_releases_nothing() -> None:
    # Prepare: the digest matches, the bytes are no safetensors
    blob = b"\x00" * 700
    unit = intake()
    unit.task(reader().task(encode_message(task(blob))))
    # Execute
    last = [unit.chunk(c) for c in chunks(blob)][-1]
    # Assert
    assert last.ready == () and last.acks == ()
    assert unit.counters.blob_errors == 1


def test_chunks_of_no_expected_blob_are_ignored() -> None:
    unit = intake()
    decisions = [unit.chunk(c) for c in chunks(encode_state(global_state(), "fp32"))]
    assert all(d.ready == () and d.acks == () for d in decisions)
    assert unit.counters.ignored_chunks == len(decisions)


def test_a_task_waits_for_its_training_program_and_carries_it() -> None:
    # Prepare: an agent that trains through programs; the global model arrives first
    blob = encode_state(global_state(), "fp32")
    program = blob_ref(PROGRAM, CHUNK)
    unit = intake(programs=True)
    # Execute
    first = unit.task(reader().task(encode_message(task(blob, program=program))))
    after_global = [unit.chunk(c) for c in chunks(blob)][-1]
    after_program = [unit.chunk(c) for c in chunks(PROGRAM)][-1]
    # Assert: the program's chunks are asked for at once, and the task held until they came
    (request,) = first.requests
    assert request.source == COORDINATOR and request.digest == program.digest
    assert request.indices == list(range(program.count))
    assert after_global.ready == ()
    (ready,) = after_program.ready
    assert ready.program == PROGRAM and program.digest in unit.programs


def test_an_agent_that_trains_with_torch_does_not_fetch_programs() -> None:
    blob = encode_state(global_state(), "fp32")
    unit = intake()
    first = unit.task(reader().task(encode_message(task(blob, program=blob_ref(PROGRAM, CHUNK)))))
    last = [unit.chunk(c) for c in chunks(blob)][-1]
    assert first.requests == ()
    (ready,) = last.ready
    assert ready.program is None


def test_missing_chunks_are_asked_for_after_a_quiet_period_and_blobs_expire() -> None:
    # Prepare: only the first chunk of the global model arrives
    clock = Clock()
    blob = encode_state(global_state(), "fp32")
    unit = intake(clock, quiet_s=5.0, limits=ReassemblyLimits(max_pending=4, timeout_s=60.0))
    unit.task(reader().task(encode_message(task(blob))))
    unit.chunk(chunks(blob)[0])
    count = blob_ref(blob, CHUNK).count
    # Execute / Assert
    clock.now += 1.0
    assert unit.tick() == []
    clock.now += 5.0
    (due,) = unit.tick()
    assert due.indices == list(range(1, count))
    clock.now += 60.0
    unit.tick()  # times out: dropped with its task
    clock.now += 5.0
    assert unit.tick() == []  # nothing more is asked for
    late = [unit.chunk(c) for c in chunks(blob)]
    assert all(d.ready == () for d in late)
    assert unit.counters.ignored_chunks == count
